//! Traffic policies: `cors`, `requestHeaders`, `responseHeaders`, `ipAllow`, `ipDeny`,
//! `circuitBreaker`, `maxInFlight`, `retryOn` and `retryBudget` (top level: the default of every
//! service; a service's own key replaces the default), and the per-service `rewrite` and `split`.
//! Read and checked here; `rewrite.regex` is compiled by the gateway's compile step (which owns
//! the regex engine) and reported at its line.

use std::time::Duration;

use crate::keys;
use crate::read::{Fields, Reader};
use crate::yaml::Node;
use crate::{parse_cidr, BackendAddr};

/// `cors`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Cors {
    /// `*`, `scheme://host[:port]`, or `scheme://*.suffix[:port]` (lower case).
    pub allow_origins: Vec<String>,
    /// Upper case.
    pub allow_methods: Vec<String>,
    /// Lower case.
    pub allow_headers: Vec<String>,
    /// Lower case.
    pub expose_headers: Vec<String>,
    pub allow_credentials: bool,
    #[serde(with = "crate::types::secs_opt")]
    pub max_age: Option<Duration>,
}

/// A variable a header rule's value may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Var {
    Consumer,
    RequestId,
    ClientIp,
    Plan,
}

/// One piece of a header rule's value.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Piece {
    Text(String),
    Var(Var),
}

/// A header rule's value: text and `${...}` variables (a variable with no value, such as
/// `${consumer}` on an unauthenticated route, is empty).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Template {
    /// As written, for `/admin/config`.
    pub source: String,
    #[serde(skip)]
    pub pieces: Vec<Piece>,
}

impl Template {
    /// Whether the value has no variables (it can be built once).
    pub fn is_static(&self) -> bool {
        self.pieces.iter().all(|p| matches!(p, Piece::Text(_)))
    }
}

/// `requestHeaders` / `responseHeaders`: names lower case, in the order written.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HeaderRules {
    pub set: Vec<(String, Template)>,
    pub add: Vec<(String, Template)>,
    pub remove: Vec<String>,
}

impl HeaderRules {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

/// `rewrite`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Rewrite {
    pub regex: String,
    pub replacement: String,
    /// The line of `rewrite.regex`, for the compile step's errors.
    #[serde(skip)]
    pub line: usize,
}

/// `split[].match`: every listed header and cookie must have exactly this value.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SplitMatch {
    /// Header names lower case.
    pub headers: Vec<(String, String)>,
    pub cookies: Vec<(String, String)>,
}

impl SplitMatch {
    pub fn is_empty(&self) -> bool {
        self.headers.is_empty() && self.cookies.is_empty()
    }
}

/// One pool of `split`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Split {
    pub name: String,
    pub weight: u32,
    pub backends: Vec<BackendAddr>,
    #[serde(rename = "match")]
    pub matches: SplitMatch,
}

/// `circuitBreaker`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CircuitBreaker {
    /// Consecutive 5xx responses or gateway-side failures that eject a backend.
    pub consecutive_5xx: u32,
    /// The first ejection's length; doubled for each ejection in a row, up to 10x.
    #[serde(with = "crate::types::secs")]
    pub eject_for: Duration,
    /// At most this share of a pool ejected at once.
    pub max_ejected_percent: u32,
}

/// A condition `retryOn` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetryOn {
    /// The connection to the backend failed or broke before the request was written.
    ConnectFailure,
    /// The backend reset the stream or closed the connection before its response.
    Reset,
    /// The backend answered with this status.
    Status(u16),
}

/// `retryBudget`: retries at most `percent` of requests, with `min_per_second` allowed
/// whatever the traffic (Envoy's retry budget).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryBudget {
    pub percent: f64,
    pub min_per_second: u32,
}

/// The policies a service applies (its own keys, else the top-level defaults).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Policies {
    pub cors: Option<Cors>,
    pub request_headers: HeaderRules,
    pub response_headers: HeaderRules,
    /// `ipAllow` CIDRs: when not empty, only these client addresses.
    pub ip_allow: Vec<String>,
    /// `ipDeny` CIDRs: refused (checked before `ipAllow`).
    pub ip_deny: Vec<String>,
    pub circuit_breaker: Option<CircuitBreaker>,
    pub max_in_flight: Option<u64>,
    pub retry_on: Vec<RetryOn>,
    pub retry_budget: Option<RetryBudget>,
}

impl Default for Policies {
    fn default() -> Self {
        Policies {
            cors: None,
            request_headers: HeaderRules::default(),
            response_headers: HeaderRules::default(),
            ip_allow: Vec::new(),
            ip_deny: Vec::new(),
            circuit_breaker: None,
            max_in_flight: None,
            retry_on: vec![RetryOn::ConnectFailure],
            retry_budget: None,
        }
    }
}

/// Request headers no rule may set, add or remove: hop-by-hop and framing fields, and the
/// fields the gateway itself sets for the backend (identity and forwarding).
pub const RESERVED_REQUEST: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "expect",
    "host",
    "content-length",
    "x-consumer-id",
    "x-request-id",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
];

/// Response headers no rule may set, add or remove: hop-by-hop and framing fields, the request
/// id the gateway answers with, and the limits' fields (a client must see its limits and when
/// to retry).
pub const RESERVED_RESPONSE: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "x-request-id",
    "ratelimit",
    "ratelimit-policy",
    "ratelimit-limit",
    "ratelimit-remaining",
    "ratelimit-reset",
    "retry-after",
];

/// Reads the policy keys of `f` (the top level or a service) over `defaults`: a key present
/// replaces the default's value.
pub(crate) fn read_policies(r: &mut Reader, f: &Fields, defaults: &Policies) -> Policies {
    let mut p = defaults.clone();
    if let Some(n) = f.get("cors") {
        p.cors = Some(read_cors(r, n, &f.key_path("cors")));
    }
    if let Some(n) = f.get("requestHeaders") {
        p.request_headers = read_rules(r, n, &f.key_path("requestHeaders"), RESERVED_REQUEST);
    }
    if let Some(n) = f.get("responseHeaders") {
        p.response_headers = read_rules(r, n, &f.key_path("responseHeaders"), RESERVED_RESPONSE);
    }
    for (key, out) in [("ipAllow", &mut p.ip_allow), ("ipDeny", &mut p.ip_deny)] {
        if let Some(list) = r.string_list(f, key) {
            out.clear();
            for (c, line) in list {
                if parse_cidr(&c).is_none() {
                    r.err(
                        line,
                        &f.key_path(key),
                        format!("expected an IP address or CIDR (IPv4 or IPv6), found {c:?}"),
                    );
                }
                out.push(c);
            }
        }
    }
    if let Some(n) = f.get("circuitBreaker") {
        let cf = r.fields(n, &f.key_path("circuitBreaker"), keys::CIRCUIT_BREAKER);
        p.circuit_breaker = Some(CircuitBreaker {
            consecutive_5xx: r.uint(&cf, "consecutive5xx").unwrap_or(5) as u32,
            eject_for: r
                .duration(&cf, "ejectFor")
                .unwrap_or(Duration::from_secs(30)),
            max_ejected_percent: r.uint(&cf, "maxEjectedPercent").unwrap_or(50) as u32,
        });
        if let Some(cb) = &p.circuit_breaker {
            if cb.eject_for < Duration::from_millis(100) {
                r.err(
                    cf.key_line("ejectFor"),
                    &cf.key_path("ejectFor"),
                    "must be at least 100ms",
                );
            }
        }
    }
    if let Some(n) = r.uint(f, "maxInFlight") {
        p.max_in_flight = Some(n);
    }
    if let Some(list) = r.string_list(f, "retryOn") {
        p.retry_on.clear();
        let allowed = keys::words(f.kind("retryOn"));
        for (word, line) in list {
            let on = match word.as_str() {
                "connect-failure" => Some(RetryOn::ConnectFailure),
                "reset" => Some(RetryOn::Reset),
                w => w
                    .parse::<u16>()
                    .ok()
                    .filter(|_| allowed.contains(&w))
                    .map(RetryOn::Status),
            };
            match on {
                Some(on) if !p.retry_on.contains(&on) => p.retry_on.push(on),
                Some(_) => {}
                None => r.err(
                    line,
                    &f.key_path("retryOn"),
                    format!("{word:?} is not a retry condition ({})", allowed.join(", ")),
                ),
            }
        }
    }
    if let Some(n) = f.get("retryBudget") {
        let bf = r.fields(n, &f.key_path("retryBudget"), keys::RETRY_BUDGET);
        let percent = r.float(&bf, "percent").unwrap_or(20.0);
        if percent > 100.0 {
            r.err(
                bf.key_line("percent"),
                &bf.key_path("percent"),
                "at most 100",
            );
        }
        p.retry_budget = Some(RetryBudget {
            percent,
            min_per_second: r.uint(&bf, "minPerSecond").unwrap_or(5) as u32,
        });
    }
    p
}

fn read_cors(r: &mut Reader, n: &Node, path: &str) -> Cors {
    let f = r.fields(n, path, keys::CORS);
    let mut origins = Vec::new();
    for (o, line) in r.string_list(&f, "allowOrigins").unwrap_or_default() {
        match origin(&o) {
            Some(o) => origins.push(o),
            None => {
                let why = origin_problem(&o);
                r.err(
                    line,
                    &f.key_path("allowOrigins"),
                    format!(
                        "{o:?} is not an origin{why}: `*`, `https://host[:port]` or `https://*.example.com`"
                    ),
                )
            }
        }
    }
    let names = |r: &mut Reader, key: &str| -> Vec<String> {
        let mut out = Vec::new();
        for (h, line) in r.string_list(&f, key).unwrap_or_default() {
            match http::HeaderName::from_bytes(h.as_bytes()) {
                Ok(n) => out.push(n.as_str().to_string()),
                Err(_) => r.err(
                    line,
                    &f.key_path(key),
                    format!("{h:?} is not a header name"),
                ),
            }
        }
        out
    };
    let allow_headers = names(r, "allowHeaders");
    let expose_headers = names(r, "exposeHeaders");
    let mut allow_methods = Vec::new();
    match r.string_list(&f, "allowMethods") {
        Some(list) => {
            for (m, line) in list {
                let up = m.to_ascii_uppercase();
                if keys::METHODS.contains(&up.as_str()) || m == "*" {
                    allow_methods.push(up);
                } else {
                    r.err(
                        line,
                        &f.key_path("allowMethods"),
                        format!("{m:?} is not a method ({})", keys::METHODS.join(", ")),
                    );
                }
            }
        }
        None => allow_methods = vec!["GET".into(), "HEAD".into(), "POST".into()],
    }
    let allow_credentials = r.bool(&f, "allowCredentials").unwrap_or(false);
    if allow_credentials && origins.iter().any(|o| o == "*") {
        r.err(
            f.key_line("allowCredentials"),
            &f.key_path("allowCredentials"),
            "not with the origin \"*\": the CORS protocol forbids credentials for any origin; list the origins",
        );
    }
    if allow_credentials {
        for (key, list) in [
            ("allowMethods", &allow_methods),
            ("allowHeaders", &allow_headers),
            ("exposeHeaders", &expose_headers),
        ] {
            if list.iter().any(|v| v == "*") {
                r.err(
                    f.key_line(key),
                    &f.key_path(key),
                    "\"*\" with allowCredentials: browsers read it as a name, not a wildcard, when credentials are on; list the names",
                );
            }
        }
    }
    Cors {
        allow_origins: origins,
        allow_methods,
        allow_headers,
        expose_headers,
        allow_credentials,
        max_age: r.duration(&f, "maxAge").filter(|d| {
            // Access-Control-Max-Age is whole seconds: a fraction would be cut off silently.
            let whole = d.subsec_nanos() == 0;
            if !whole {
                r.err(
                    f.key_line("maxAge"),
                    &f.key_path("maxAge"),
                    "a whole number of seconds (Access-Control-Max-Age counts seconds)",
                );
            }
            whole
        }),
    }
}

/// An allowed origin, lower case: `*`, or `scheme://host[:port]` where the host may start with
/// `*.` (any subdomain).
/// Why `origin` refused `o`, for the error message (empty when no specific reason).
fn origin_problem(o: &str) -> &'static str {
    let o = o.to_ascii_lowercase();
    let Some((scheme, rest)) = o.split_once("://") else {
        return " (no scheme://)";
    };
    if let Some((_, port)) = rest
        .rsplit_once(':')
        .filter(|(h, _)| !h.ends_with(']') || h.starts_with('['))
    {
        match port.parse::<u16>() {
            Ok(443) if scheme == "https" => {
                return " (browsers never send the default port 443: leave it out)"
            }
            Ok(80) if scheme == "http" => {
                return " (browsers never send the default port 80: leave it out)"
            }
            Ok(0) | Err(_) => return " (the port must be 1 to 65535)",
            _ => {}
        }
    }
    if rest.starts_with("*.") && !rest[2..].split(':').next().unwrap_or("").contains('.') {
        return " (a wildcard needs two labels after `*.`: `*.example.com`, not `*.com`)";
    }
    if rest.contains('/') {
        return " (no path)";
    }
    ""
}

fn origin(o: &str) -> Option<String> {
    if o == "*" {
        return Some(o.into());
    }
    let o = o.to_ascii_lowercase();
    let (scheme, rest) = o.split_once("://")?;
    if scheme.is_empty()
        || !scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
    {
        return None;
    }
    let host = match rest.rsplit_once(':') {
        Some((h, port)) if !h.ends_with(']') || h.starts_with('[') => {
            // A port browsers would send: 1 to 65535, and never the scheme's default (an
            // origin never carries it, so the entry could never match).
            let n = port.parse::<u16>().ok().filter(|n| *n > 0)?;
            if !port.bytes().all(|b| b.is_ascii_digit())
                || (scheme == "https" && n == 443)
                || (scheme == "http" && n == 80)
            {
                return None;
            }
            h
        }
        _ => rest,
    };
    let wildcard = host.starts_with("*.");
    let bare = host.strip_prefix("*.").unwrap_or(host);
    let ok = !bare.is_empty()
        && !bare.starts_with('.')
        && !bare.ends_with('.')
        && !bare.contains("..")
        // `*.com` would be every site under a top-level domain: a wildcard needs a registrable
        // name (two labels at least) after it.
        && (!wildcard || bare.contains('.'))
        && (bare.starts_with('[') && bare.ends_with(']') && !wildcard
            || bare
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b)));
    ok.then_some(o)
}

fn read_rules(r: &mut Reader, n: &Node, path: &str, reserved: &[&str]) -> HeaderRules {
    let decls = if reserved == RESERVED_REQUEST {
        keys::REQUEST_HEADER_RULES
    } else {
        keys::RESPONSE_HEADER_RULES
    };
    let f = r.fields(n, path, decls);
    let mut rules = HeaderRules::default();
    let name = |r: &mut Reader, key: &str, line: usize, h: &str| -> Option<String> {
        match http::HeaderName::from_bytes(h.as_bytes()) {
            Ok(n) if reserved.contains(&n.as_str()) => {
                r.err(
                    line,
                    &format!("{path}.{key}"),
                    format!("{h:?} is set by the gateway (hop-by-hop, framing or identity): no rule may change it"),
                );
                None
            }
            Ok(n) => Some(n.as_str().to_string()),
            Err(_) => {
                r.err(
                    line,
                    &format!("{path}.{key}"),
                    format!("{h:?} is not a header name"),
                );
                None
            }
        }
    };
    for key in ["set", "add"] {
        let line = f.key_line(key);
        for (h, v) in r.string_map(&f, key).unwrap_or_default() {
            let Some(h) = name(r, key, line, &h) else {
                continue;
            };
            let list = if key == "set" { &rules.set } else { &rules.add };
            if list.iter().any(|(n, _)| *n == h) {
                r.err(
                    line,
                    &format!("{path}.{key}"),
                    format!("{h:?} is named twice (header names are case-insensitive)"),
                );
                continue;
            }
            match template(&v) {
                Ok(t) => {
                    let list = if key == "set" {
                        &mut rules.set
                    } else {
                        &mut rules.add
                    };
                    list.push((h, t));
                }
                Err(e) => r.err(line, &format!("{path}.{key}.{h}"), e),
            }
        }
    }
    for (h, line) in r.string_list(&f, "remove").unwrap_or_default() {
        if let Some(h) = name(r, "remove", line, &h) {
            rules.remove.push(h);
        }
    }
    rules
}

/// A header rule's value: `${consumer}`, `${request_id}`, `${client_ip}` and `${plan}`; other
/// text must be a valid header value (visible ASCII, spaces and tabs).
pub(crate) fn template(v: &str) -> Result<Template, String> {
    let mut pieces = Vec::new();
    let mut rest = v;
    while let Some(i) = rest.find("${") {
        if i > 0 {
            pieces.push(Piece::Text(rest[..i].to_string()));
        }
        let after = &rest[i + 2..];
        let Some(end) = after.find('}') else {
            return Err(format!("{v:?}: \"${{\" without its \"}}\""));
        };
        let var = match &after[..end] {
            "consumer" => Var::Consumer,
            "request_id" => Var::RequestId,
            "client_ip" => Var::ClientIp,
            "plan" => Var::Plan,
            other => {
                return Err(format!(
                    "{v:?}: unknown variable ${{{other}}} (consumer, request_id, client_ip, plan)"
                ))
            }
        };
        pieces.push(Piece::Var(var));
        rest = &after[end + 1..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Text(rest.to_string()));
    }
    for p in &pieces {
        if let Piece::Text(t) = p {
            if http::HeaderValue::from_str(t).is_err() || t.bytes().any(|b| b == 0x7f) {
                return Err(format!("{v:?} is not a valid header value"));
            }
        }
    }
    Ok(Template {
        source: v.to_string(),
        pieces,
    })
}

/// `rewrite` (the regex is compiled by the compile step).
pub(crate) fn read_rewrite(r: &mut Reader, n: &Node, path: &str) -> Rewrite {
    let f = r.fields(n, path, keys::REWRITE);
    for k in ["regex", "replacement"] {
        if !f.has(k) {
            r.err(f.line, &f.key_path(k), "required");
        }
    }
    Rewrite {
        regex: r.string(&f, "regex").unwrap_or_default(),
        replacement: r.string(&f, "replacement").unwrap_or_default(),
        line: f.key_line("regex"),
    }
}

/// `split`: named pools with weights and optional matches.
pub(crate) fn read_split(
    r: &mut Reader,
    f: &Fields,
    backend: &mut dyn FnMut(&mut Reader, &str, usize, &str) -> Option<BackendAddr>,
) -> Vec<Split> {
    let Some(items) = r.list(f, "split") else {
        return Vec::new();
    };
    let mut out: Vec<Split> = Vec::new();
    for (i, n) in items.iter().enumerate() {
        let path = format!("{}[{i}]", f.key_path("split"));
        let sf = r.fields(n, &path, keys::SPLIT);
        let name = r.string(&sf, "name").unwrap_or_default();
        if !crate::read::valid_name(&name) {
            r.err(
                sf.key_line("name"),
                &sf.key_path("name"),
                "required: letters, digits, '-', '_' or '.'",
            );
        } else if out.iter().any(|s| s.name == name) {
            r.err(
                sf.key_line("name"),
                &sf.key_path("name"),
                format!("duplicate split {name:?}"),
            );
        }
        if !sf.has("weight") {
            r.err(sf.line, &sf.key_path("weight"), "required");
        }
        let mut backends = Vec::new();
        for (b, line) in r.string_list(&sf, "backends").unwrap_or_default() {
            if let Some(addr) = backend(r, &b, line, &sf.key_path("backends")) {
                backends.push(addr);
            }
        }
        if backends.is_empty() {
            r.err(
                sf.line,
                &sf.key_path("backends"),
                "required: at least one backend",
            );
        }
        let mut matches = SplitMatch::default();
        if let Some(mn) = sf.get("match") {
            let mf = r.fields(mn, &sf.key_path("match"), keys::SPLIT_MATCH);
            for (h, v) in r.string_map(&mf, "headers").unwrap_or_default() {
                match http::HeaderName::from_bytes(h.as_bytes()) {
                    Ok(n) => matches.headers.push((n.as_str().to_string(), v)),
                    Err(_) => r.err(
                        mf.key_line("headers"),
                        &mf.key_path("headers"),
                        format!("{h:?} is not a header name"),
                    ),
                }
            }
            matches.cookies = r.string_map(&mf, "cookies").unwrap_or_default();
        }
        out.push(Split {
            name,
            weight: r.uint(&sf, "weight").unwrap_or(0) as u32,
            backends,
            matches,
        });
    }
    if !out.is_empty() && out.iter().all(|s| s.weight == 0) {
        r.err(
            f.key_line("split"),
            &f.key_path("split"),
            "every weight is 0: no request could be sent anywhere but by a match",
        );
    }
    out
}
