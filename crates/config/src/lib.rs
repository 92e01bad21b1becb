//! Configuration: the seed-compatible YAML read into validated, typed values (all problems at once,
//! each with file, line and key). `compile` turns a `Config` into the runtime snapshot.

pub mod duration;
pub mod read;
pub mod yaml;

use std::collections::HashSet;
use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use read::{Fields, Reader};
use yaml::Node;

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}:{}: {}", self.file, self.line, self.message)
        } else {
            write!(
                f,
                "{}:{}: {}: {}",
                self.file, self.line, self.key, self.message
            )
        }
    }
}

/// Every problem found in one config.
#[derive(Debug, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum LoadBalancing {
    RoundRobin,
    LeastRequest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum PathType {
    Prefix,
    Exact,
}

// The policy choices live with their rules (a lower layer); the config names them.
pub use hexgate_http::rules::headers::UnderscoreHeaders;
pub use hexgate_http::rules::path::EscapedSlashes;

/// A static backend address, `http://host:port`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct BackendAddr {
    pub host: String,
    pub port: u16,
}

impl BackendAddr {
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}", self.authority())
    }
}

#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Timeouts {
    #[serde(with = "secs")]
    pub connect: Duration,
    #[serde(with = "secs")]
    pub request: Duration,
    #[serde(with = "secs")]
    pub idle: Duration,
    #[serde(with = "secs")]
    pub header_read: Duration,
}

#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    pub enabled: bool,
    pub rate_per_second: f64,
    pub burst: u64,
    pub key: String,
}

#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Quota {
    pub enabled: bool,
    pub limit: u64,
    #[serde(with = "secs")]
    pub period: Duration,
    pub key: String,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Authentication {
    pub enabled: bool,
    pub public_key_path: Option<String>,
    pub public_keys: Vec<String>,
    #[serde(serialize_with = "redact_url")]
    pub jwks_url: Option<String>,
    pub algorithms: Vec<String>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    #[serde(with = "secs")]
    pub leeway: Duration,
    pub require_exp: bool,
    pub consumer_claim: String,
    pub forward_claims: Vec<(String, String)>,
    pub strip_authorization: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Tls {
    pub enabled: bool,
    pub https_port: u16,
    pub cert_file: String,
    pub key_file: String,
}

#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Redis {
    pub address: Option<String>,
    pub cluster: Vec<String>,
    pub username: Option<String>,
    #[serde(serialize_with = "redact")]
    pub password: String,
    pub db: u64,
    pub tls: bool,
    #[serde(with = "secs")]
    pub timeout: Duration,
    pub failure_mode: String,
    pub key_prefix: String,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Consul {
    #[serde(serialize_with = "redact_url")]
    pub address: Option<String>,
    #[serde(serialize_with = "redact_opt")]
    pub token: Option<String>,
    pub ca_cert: Option<String>,
    pub datacenter: Option<String>,
    pub register: bool,
    pub service_name: String,
    /// Address registered for this instance (default: adminBind, or when that is 0.0.0.0 the
    /// local address used to reach Consul).
    pub advertise_address: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub name: String,
    #[serde(skip)]
    pub line: usize,
    pub path: String,
    pub path_type: PathType,
    pub strip_path: bool,
    pub hosts: Vec<String>,
    pub methods: Vec<String>,
    pub backends: Vec<BackendAddr>,
    pub consul_service_name: Option<String>,
    pub consul_tags: Vec<String>,
    pub consul_datacenter: Option<String>,
    pub load_balancing: LoadBalancing,
    pub timeouts: Timeouts,
    pub retries: u32,
    pub health_check_path: String,
    pub max_body_size: Option<u64>,
    pub authentication: Option<bool>,
    pub rate_limiting: Option<RateLimit>,
    pub quota: Option<Quota>,
    /// `escapedSlashes` for this route (default: the top-level value).
    pub escaped_slashes: EscapedSlashes,
    /// `allowedUpgrades`: the `Upgrade` tokens tunnelled on this route, lower-case.
    pub allowed_upgrades: Vec<String>,
}

/// A validated configuration, defaults applied. Produced by [`parse`].
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    pub gateway_bind: IpAddr,
    pub gateway_port: u16,
    pub admin_bind: IpAddr,
    pub admin_port: u16,
    #[serde(with = "secs")]
    pub health_check_interval: Duration,
    pub health_check_path: String,
    #[serde(with = "secs")]
    pub health_check_timeout: Duration,
    pub services: Vec<Service>,
    pub rate_limiting: Option<RateLimit>,
    pub rate_limit_headers: String,
    pub authentication: Authentication,
    pub tls: Tls,
    pub redis: Option<Redis>,
    pub consul: Consul,
    pub timeouts: Timeouts,
    pub retries: u32,
    pub max_header_size: u64,
    pub max_body_size: Option<u64>,
    pub max_connections: u64,
    pub access_log: bool,
    #[serde(with = "secs")]
    pub shutdown_timeout: Duration,
    pub trusted_proxies: Vec<String>,
    /// Most request header fields accepted (431 beyond).
    pub max_header_count: u64,
    pub underscore_headers: UnderscoreHeaders,
    /// Default `escapedSlashes` for every service.
    pub escaped_slashes: EscapedSlashes,
    /// Default `allowedUpgrades` for every service.
    pub allowed_upgrades: Vec<String>,
    /// Bearer token for the admin listener (`adminToken`); see [`Config::admin_token_source`].
    #[serde(serialize_with = "redact_opt")]
    pub admin_token: Option<String>,
    /// `adminTokenFile`: a file holding the admin token.
    pub admin_token_file: Option<String>,
    /// The line of each key that names a file (`tls.certFile`, `authentication.publicKeys[1]`,
    /// ...), so a problem found in the file is reported where the file was named.
    #[serde(skip)]
    pub file_key_lines: std::collections::BTreeMap<String, usize>,
    /// Directory of the config file, for resolving relative key paths.
    #[serde(skip)]
    pub base_dir: Option<std::path::PathBuf>,
    /// The file name used in error messages.
    #[serde(skip)]
    pub file: String,
}

mod secs {
    use std::time::Duration;
    pub(crate) fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}ms", d.as_millis()))
    }
}

fn redact<S: serde::Serializer>(v: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(if v.is_empty() { "" } else { "<redacted>" })
}

fn redact_url<S: serde::Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(u) => s.serialize_str(&hexgate_http::httpc::redact_url(u)),
        None => s.serialize_none(),
    }
}

fn redact_opt<S: serde::Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_str("<redacted>"),
        None => s.serialize_none(),
    }
}

const TOP_KEYS: &[&str] = &[
    "gatewayPort",
    "gatewayBind",
    "adminPort",
    "adminBind",
    "healthCheckInterval",
    "healthCheckPath",
    "healthCheckTimeout",
    "services",
    "rateLimiting",
    "rateLimitHeaders",
    "authentication",
    "tls",
    "redis",
    "consul",
    "timeouts",
    "retries",
    "maxHeaderSize",
    "maxBodySize",
    "maxConnections",
    "accessLog",
    "shutdownTimeout",
    "trustedProxies",
    "loadBalancing",
    "maxHeaderCount",
    "underscoreHeaders",
    "escapedSlashes",
    "allowedUpgrades",
    "adminToken",
    "adminTokenFile",
];

const SERVICE_KEYS: &[&str] = &[
    "name",
    "path",
    "pathType",
    "stripPath",
    "hosts",
    "methods",
    "backends",
    "consulServiceName",
    "consulTags",
    "consulDatacenter",
    "loadBalancing",
    "timeouts",
    "retries",
    "healthCheckPath",
    "maxBodySize",
    "authentication",
    "rateLimiting",
    "quota",
    "escapedSlashes",
    "allowedUpgrades",
];

const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT",
];

/// Reads and validates a config file.
pub fn load_file(path: &Path) -> Result<Config, ConfigErrors> {
    load_file_with(path, |_| Ok(()))
}

/// Like [`load_file`], for a reload: a file with nothing but blanks and comments is refused
/// (most likely caught while being rewritten) instead of replacing every route with none.
pub fn load_file_for_reload(path: &Path) -> Result<Config, ConfigErrors> {
    load_file_with(path, |text| {
        let empty = text.lines().all(|l| {
            let t = l.trim();
            t.is_empty() || t.starts_with('#')
        });
        if empty {
            Err("the file is empty (perhaps caught while being rewritten)".to_string())
        } else {
            Ok(())
        }
    })
}

fn load_file_with(
    path: &Path,
    precheck: impl FnOnce(&str) -> Result<(), String>,
) -> Result<Config, ConfigErrors> {
    let name = path.display().to_string();
    let whole_file_error = |message: String| {
        ConfigErrors(vec![ConfigError {
            file: name.clone(),
            line: 0,
            key: String::new(),
            message,
        }])
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| whole_file_error(format!("cannot read file: {e}")))?;
    precheck(&text).map_err(whole_file_error)?;
    parse(&text, &name).map(|mut c| {
        c.base_dir = path.parent().map(|p| p.to_path_buf());
        c
    })
}

/// Parses and validates config text; `file` names it in errors.
pub fn parse(text: &str, file: &str) -> Result<Config, ConfigErrors> {
    let root = yaml::parse(text).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: file.to_string(),
            line: e.line,
            key: String::new(),
            message: format!("YAML syntax error at column {}: {}", e.col, e.message),
        }])
    })?;
    let mut r = Reader::new(file);
    let cfg = read_config(&mut r, &root);
    if r.errors.is_empty() {
        Ok(cfg)
    } else {
        r.errors.sort_by_key(|e| e.line);
        Err(ConfigErrors(r.errors))
    }
}

fn read_timeouts(r: &mut Reader, node: Option<&Node>, path: &str, base: &Timeouts) -> Timeouts {
    let mut t = base.clone();
    if let Some(node) = node {
        let f = r.fields(node, path, &["connect", "request", "idle", "headerRead"]);
        for (key, slot) in [
            ("connect", &mut t.connect),
            ("request", &mut t.request),
            ("idle", &mut t.idle),
            ("headerRead", &mut t.header_read),
        ] {
            if let Some(d) = r.duration(&f, key) {
                if d.is_zero() {
                    r.err(f.key_line(key), &f.key_path(key), "must be greater than 0");
                } else {
                    *slot = d;
                }
            }
        }
    }
    t
}

fn read_rate_limit(r: &mut Reader, node: &Node, path: &str) -> RateLimit {
    let f = r.fields(node, path, &["enabled", "ratePerSecond", "burst", "key"]);
    let enabled = r.bool(&f, "enabled").unwrap_or(false);
    let rate = r.float(&f, "ratePerSecond", 0.0);
    let burst = r.uint(&f, "burst", 1, 1_000_000_000);
    if enabled && rate.is_none() && !f.has("ratePerSecond") {
        r.err(
            f.line,
            &f.key_path("ratePerSecond"),
            "required when enabled",
        );
    }
    let key = read_limit_key(r, &f, "ip");
    RateLimit {
        enabled,
        rate_per_second: rate.unwrap_or(1.0),
        burst: burst.unwrap_or(1),
        key,
    }
}

fn read_limit_key(r: &mut Reader, f: &Fields, default: &str) -> String {
    let Some(k) = r.string(f, "key") else {
        return default.to_string();
    };
    let ok = k == "ip"
        || k == "consumer"
        || k.strip_prefix("header:")
            .is_some_and(|h| !h.is_empty() && http::HeaderName::from_bytes(h.as_bytes()).is_ok());
    if !ok {
        r.err(
            f.key_line("key"),
            &f.key_path("key"),
            format!("must be ip, consumer or header:NAME, found {k:?}"),
        );
    }
    k
}

fn read_quota(r: &mut Reader, node: &Node, path: &str) -> Quota {
    let f = r.fields(node, path, &["enabled", "limit", "period", "key"]);
    let enabled = r.bool(&f, "enabled").unwrap_or(false);
    let limit = r.uint(&f, "limit", 1, u32::MAX as u64);
    let period = r.duration(&f, "period");
    if enabled {
        for k in ["limit", "period"] {
            if !f.has(k) {
                r.err(f.line, &f.key_path(k), "required when enabled");
            }
        }
    }
    if let Some(p) = period {
        if p < Duration::from_secs(1) {
            r.err(
                f.key_line("period"),
                &f.key_path("period"),
                "must be at least 1s",
            );
        }
    }
    let key = read_limit_key(r, &f, "consumer");
    Quota {
        enabled,
        limit: limit.unwrap_or(1),
        period: period.unwrap_or(Duration::from_secs(60)),
        key,
    }
}

fn read_backend(r: &mut Reader, s: &str, line: usize, path: &str) -> Option<BackendAddr> {
    // Error messages show the URL with any userinfo and query values redacted.
    let shown = hexgate_http::httpc::redact_url(s);
    let rest = match s.split_once("://") {
        Some(("http", rest)) => rest,
        Some((scheme, _)) => {
            r.err(
                line,
                path,
                format!(
                    "unsupported scheme {scheme:?} in {shown:?} (backends are http://host:port)"
                ),
            );
            return None;
        }
        None => s,
    };
    let authority = rest.trim_end_matches('/');
    if authority.contains('/') || authority.contains('?') || authority.contains('@') {
        r.err(
            line,
            path,
            format!("backend {shown:?} must be http://host:port with no path"),
        );
        return None;
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        match v6.split_once(']') {
            Some((h, p)) => (h.to_string(), p.strip_prefix(':').unwrap_or("")),
            None => {
                r.err(line, path, format!("bad IPv6 address in {shown:?}"));
                return None;
            }
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p),
            None => (authority.to_string(), ""),
        }
    };
    let port = if port.is_empty() {
        80
    } else {
        match port.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => {
                r.err(line, path, format!("bad port in backend {shown:?}"));
                return None;
            }
        }
    };
    if host.is_empty()
        || !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-_:".contains(c))
    {
        r.err(line, path, format!("bad host in backend {shown:?}"));
        return None;
    }
    Some(BackendAddr { host, port })
}

fn read_service(r: &mut Reader, node: &Node, path: &str, top: &Config) -> Service {
    let f = r.fields(node, path, SERVICE_KEYS);
    let name = r.string(&f, "name").unwrap_or_default();
    if name.is_empty() {
        r.err(f.line, &f.key_path("name"), "required");
    } else if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        r.err(
            f.key_line("name"),
            &f.key_path("name"),
            "use letters, digits, '-', '_' or '.'",
        );
    }
    let svc_path = r.string(&f, "path").unwrap_or_default();
    if svc_path.is_empty() {
        r.err(f.line, &f.key_path("path"), "required (e.g. \"/users/\")");
    } else if !svc_path.starts_with('/') {
        r.err(
            f.key_line("path"),
            &f.key_path("path"),
            format!("must start with '/', found {svc_path:?}"),
        );
    } else if svc_path.contains(';') {
        r.err(
            f.key_line("path"),
            &f.key_path("path"),
            format!("must not contain ';' (requests are routed on paths read without their ';' parameters), found {svc_path:?}"),
        );
    } else if hexgate_http::rules::path::normalize_path(&svc_path).as_deref()
        != Ok(svc_path.as_str())
    {
        r.err(
            f.key_line("path"),
            &f.key_path("path"),
            format!(
                "must be a normalized path (no dot segments, '//' or needless %-escapes), found {svc_path:?}"
            ),
        );
    }
    let path_type = match r.choice(&f, "pathType", &["prefix", "exact"]).as_deref() {
        Some("exact") => PathType::Exact,
        _ => PathType::Prefix,
    };
    let mut backends = Vec::new();
    if let Some(list) = r.string_list(&f, "backends") {
        for (i, (b, line)) in list.iter().enumerate() {
            let p = format!("{}[{i}]", f.key_path("backends"));
            if let Some(addr) = read_backend(r, b, *line, &p) {
                if backends.contains(&addr) {
                    r.err(*line, &p, format!("duplicate backend {b:?}"));
                } else {
                    backends.push(addr);
                }
            }
        }
    }
    let consul_service_name = r.string(&f, "consulServiceName").filter(|s| !s.is_empty());
    if backends.is_empty() && consul_service_name.is_none() {
        r.err(
            f.line,
            path,
            format!("service {name:?} needs backends or consulServiceName (or both)"),
        );
    }
    let mut hosts = Vec::new();
    for (h, line) in r.string_list(&f, "hosts").unwrap_or_default() {
        // The same canonical form requests are matched in (rules::host); `*.` may lead.
        let (wild, name) = match h.strip_prefix("*.") {
            Some(rest) => ("*.", rest),
            None => ("", h.as_str()),
        };
        match hexgate_http::rules::host::canonical_name(name.as_bytes()) {
            Ok(c) => hosts.push(format!("{wild}{c}")),
            Err(e) => r.err(
                line,
                &f.key_path("hosts"),
                format!("{h:?}: {e} (expected a host name such as api.example.com or *.example.com, no port)"),
            ),
        }
    }
    let mut methods = Vec::new();
    for (m, line) in r.string_list(&f, "methods").unwrap_or_default() {
        let up = m.to_ascii_uppercase();
        if METHODS.contains(&up.as_str()) {
            methods.push(up);
        } else {
            r.err(
                line,
                &f.key_path("methods"),
                format!("unknown HTTP method {m:?}"),
            );
        }
    }
    let load_balancing = read_lb(r, &f).unwrap_or(LoadBalancing::RoundRobin);
    let timeouts = read_timeouts(r, f.get("timeouts"), &f.key_path("timeouts"), &top.timeouts);
    let authentication = match f.get("authentication") {
        Some(n) => {
            let af = r.fields(n, &f.key_path("authentication"), &["enabled"]);
            r.bool(&af, "enabled")
        }
        None => None,
    };
    let rate_limiting = f
        .get("rateLimiting")
        .map(|n| read_rate_limit(r, n, &f.key_path("rateLimiting")));
    let quota = f
        .get("quota")
        .map(|n| read_quota(r, n, &f.key_path("quota")));
    let escaped_slashes = read_escaped_slashes(r, &f).unwrap_or(top.escaped_slashes);
    let allowed_upgrades = read_upgrades(r, &f).unwrap_or_else(|| top.allowed_upgrades.clone());
    Service {
        escaped_slashes,
        allowed_upgrades,
        line: f.line,
        path: svc_path,
        path_type,
        strip_path: r.bool(&f, "stripPath").unwrap_or(false),
        hosts,
        methods,
        backends,
        consul_service_name,
        consul_tags: r
            .string_list(&f, "consulTags")
            .unwrap_or_default()
            .into_iter()
            .map(|(t, _)| t)
            .collect(),
        consul_datacenter: r.string(&f, "consulDatacenter"),
        load_balancing,
        timeouts,
        retries: r
            .uint(&f, "retries", 0, 10)
            .map(|v| v as u32)
            .unwrap_or(top.retries),
        health_check_path: r
            .string(&f, "healthCheckPath")
            .unwrap_or_else(|| top.health_check_path.clone()),
        max_body_size: r.size(&f, "maxBodySize").or(top.max_body_size),
        authentication,
        rate_limiting,
        quota,
        name,
    }
}

fn read_escaped_slashes(r: &mut Reader, f: &Fields) -> Option<EscapedSlashes> {
    match r
        .choice(f, "escapedSlashes", &["reject", "keep", "decode"])
        .as_deref()
    {
        Some("keep") => Some(EscapedSlashes::Keep),
        Some("decode") => Some(EscapedSlashes::Decode),
        Some(_) => Some(EscapedSlashes::Reject),
        None => None,
    }
}

/// `allowedUpgrades`: protocol tokens (RFC 9110 `token`, compared case-insensitively).
fn read_upgrades(r: &mut Reader, f: &Fields) -> Option<Vec<String>> {
    let list = r.string_list(f, "allowedUpgrades")?;
    let mut out = Vec::new();
    for (t, line) in list {
        let ok = !t.is_empty()
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~/".contains(&b));
        if ok {
            out.push(t.to_ascii_lowercase());
        } else {
            r.err(
                line,
                &f.key_path("allowedUpgrades"),
                format!("{t:?} is not a protocol token (e.g. websocket)"),
            );
        }
    }
    Some(out)
}

fn read_lb(r: &mut Reader, f: &Fields) -> Option<LoadBalancing> {
    match r
        .choice(f, "loadBalancing", &["roundRobin", "leastRequest"])
        .as_deref()
    {
        Some("leastRequest") => Some(LoadBalancing::LeastRequest),
        Some(_) => Some(LoadBalancing::RoundRobin),
        None => None,
    }
}

fn read_ip(r: &mut Reader, f: &Fields, key: &str, default: IpAddr) -> IpAddr {
    match r.string(f, key) {
        Some(s) => match s.parse::<IpAddr>() {
            Ok(ip) => ip,
            Err(_) => {
                r.err(
                    f.key_line(key),
                    &f.key_path(key),
                    format!("expected an IP address, found {s:?}"),
                );
                default
            }
        },
        None => default,
    }
}

fn read_auth(r: &mut Reader, node: Option<&Node>) -> Authentication {
    let mut a = Authentication {
        algorithms: vec!["RS256".into()],
        leeway: Duration::from_secs(30),
        require_exp: true,
        consumer_claim: "sub".into(),
        ..Default::default()
    };
    let Some(node) = node else { return a };
    let f = r.fields(
        node,
        "authentication",
        &[
            "enabled",
            "publicKeyPath",
            "publicKeys",
            "jwksUrl",
            "algorithms",
            "issuer",
            "audience",
            "leeway",
            "requireExp",
            "consumerClaim",
            "forwardClaims",
            "stripAuthorization",
        ],
    );
    a.enabled = r.bool(&f, "enabled").unwrap_or(false);
    a.public_key_path = r.string(&f, "publicKeyPath").filter(|s| !s.is_empty());
    a.public_keys = r
        .string_list(&f, "publicKeys")
        .unwrap_or_default()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    a.jwks_url = r.string(&f, "jwksUrl").filter(|s| !s.is_empty());
    if let Some(u) = &a.jwks_url {
        if !(u.starts_with("http://") || u.starts_with("https://")) {
            r.err(
                f.key_line("jwksUrl"),
                "authentication.jwksUrl",
                "must be an http:// or https:// URL",
            );
        }
    }
    if let Some(algs) = r.string_list(&f, "algorithms") {
        const ALGS: &[&str] = &[
            "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
        ];
        a.algorithms.clear();
        for (alg, line) in algs {
            if ALGS.contains(&alg.as_str()) {
                a.algorithms.push(alg);
            } else {
                r.err(
                    line,
                    "authentication.algorithms",
                    format!(
                        "algorithm {alg:?} is not allowed (asymmetric only: {})",
                        ALGS.join(", ")
                    ),
                );
            }
        }
        if a.algorithms.is_empty() {
            r.err(
                f.key_line("algorithms"),
                "authentication.algorithms",
                "must list at least one algorithm",
            );
        }
    }
    a.issuer = r.string(&f, "issuer");
    a.audience = r.string(&f, "audience");
    if let Some(l) = r.duration(&f, "leeway") {
        a.leeway = l;
    }
    a.require_exp = r.bool(&f, "requireExp").unwrap_or(true);
    if let Some(c) = r.string(&f, "consumerClaim") {
        a.consumer_claim = c;
    }
    a.forward_claims = r.string_map(&f, "forwardClaims").unwrap_or_default();
    for (claim, header) in &a.forward_claims {
        if http::HeaderName::from_bytes(header.as_bytes()).is_err() {
            r.err(
                f.key_line("forwardClaims"),
                &format!("authentication.forwardClaims.{claim}"),
                format!("{header:?} is not a valid header name"),
            );
        }
    }
    a.strip_authorization = r.bool(&f, "stripAuthorization").unwrap_or(false);
    if a.enabled && a.public_key_path.is_none() && a.public_keys.is_empty() && a.jwks_url.is_none()
    {
        r.err(
            f.line,
            "authentication",
            "enabled but no key: set publicKeyPath, publicKeys or jwksUrl",
        );
    }
    a
}

fn read_redis(r: &mut Reader, node: &Node) -> Redis {
    let f = r.fields(
        node,
        "redis",
        &[
            "address",
            "cluster",
            "username",
            "password",
            "db",
            "tls",
            "timeout",
            "failureMode",
            "keyPrefix",
        ],
    );
    let address = r.string(&f, "address").filter(|s| !s.is_empty());
    if let Some(a) = &address {
        if !a.contains(':') || a.contains('@') || a.contains('/') {
            r.err(
                f.key_line("address"),
                "redis.address",
                format!(
                    "expected host:port (credentials go in username and password), found {:?}",
                    hexgate_http::httpc::redact_url(a)
                ),
            );
        }
    }
    Redis {
        address,
        cluster: r
            .string_list(&f, "cluster")
            .unwrap_or_default()
            .into_iter()
            .map(|(s, _)| s)
            .collect(),
        username: r.string(&f, "username").filter(|s| !s.is_empty()),
        password: r.string(&f, "password").unwrap_or_default(),
        db: r.uint(&f, "db", 0, 15).unwrap_or(0),
        tls: r.bool(&f, "tls").unwrap_or(false),
        timeout: r
            .duration(&f, "timeout")
            .unwrap_or(Duration::from_millis(50)),
        failure_mode: r
            .choice(&f, "failureMode", &["open", "closed"])
            .unwrap_or_else(|| "open".into()),
        key_prefix: r
            .string(&f, "keyPrefix")
            .unwrap_or_else(|| "hexgate:".into()),
    }
}

fn read_consul(r: &mut Reader, node: Option<&Node>) -> Consul {
    let mut c = Consul {
        service_name: "hexgate".into(),
        ..Default::default()
    };
    let Some(node) = node else { return c };
    let f = r.fields(
        node,
        "consul",
        &[
            "address",
            "token",
            "caCert",
            "datacenter",
            "register",
            "serviceName",
            "advertiseAddress",
        ],
    );
    c.address = r.string(&f, "address");
    c.token = r.string(&f, "token");
    c.ca_cert = r.string(&f, "caCert");
    c.datacenter = r.string(&f, "datacenter");
    c.register = r.bool(&f, "register").unwrap_or(false);
    if let Some(n) = r.string(&f, "serviceName") {
        c.service_name = n;
    }
    c.advertise_address = r.string(&f, "advertiseAddress");
    if let Some(a) = &c.address {
        if hexgate_http::httpc::Endpoint::parse(a, false, None).is_err() {
            r.err(
                f.key_line("address"),
                "consul.address",
                format!(
                    "expected host:port or http(s)://host:port, found {:?}",
                    hexgate_http::httpc::redact_url(a)
                ),
            );
        }
    }
    c
}

fn read_config(r: &mut Reader, root: &Node) -> Config {
    let f = r.fields(root, "", TOP_KEYS);
    let mut cfg = Config {
        gateway_bind: read_ip(r, &f, "gatewayBind", IpAddr::from([0, 0, 0, 0])),
        gateway_port: r.port(&f, "gatewayPort").unwrap_or(8000),
        admin_bind: read_ip(r, &f, "adminBind", IpAddr::from([127, 0, 0, 1])),
        admin_port: r.port(&f, "adminPort").unwrap_or(9901),
        health_check_interval: r
            .duration(&f, "healthCheckInterval")
            .unwrap_or(Duration::from_secs(5)),
        health_check_path: r
            .string(&f, "healthCheckPath")
            .unwrap_or_else(|| "/health".into()),
        health_check_timeout: r
            .duration(&f, "healthCheckTimeout")
            .unwrap_or(Duration::from_secs(2)),
        services: Vec::new(),
        rate_limiting: None,
        rate_limit_headers: r
            .choice(&f, "rateLimitHeaders", &["draft", "legacy", "both", "none"])
            .unwrap_or_else(|| "draft".into()),
        authentication: Authentication::default(),
        tls: Tls {
            enabled: false,
            https_port: 8443,
            cert_file: "./config/cert.pem".into(),
            key_file: "./config/key.pem".into(),
        },
        redis: None,
        consul: Consul::default(),
        timeouts: Timeouts {
            connect: Duration::from_secs(2),
            request: Duration::from_secs(30),
            idle: Duration::from_secs(60),
            header_read: Duration::from_secs(10),
        },
        retries: r.uint(&f, "retries", 0, 10).map(|v| v as u32).unwrap_or(2),
        max_header_size: r.size(&f, "maxHeaderSize").unwrap_or(64 * 1024),
        max_body_size: r.size(&f, "maxBodySize"),
        max_connections: r
            .uint(&f, "maxConnections", 1, 10_000_000)
            .unwrap_or(20_000),
        access_log: r.bool(&f, "accessLog").unwrap_or(false),
        shutdown_timeout: r
            .duration(&f, "shutdownTimeout")
            .unwrap_or(Duration::from_secs(30)),
        trusted_proxies: Vec::new(),
        max_header_count: r.uint(&f, "maxHeaderCount", 1, 10_000).unwrap_or(100),
        underscore_headers: match r
            .choice(&f, "underscoreHeaders", &["drop", "reject", "allow"])
            .as_deref()
        {
            Some("reject") => UnderscoreHeaders::Reject,
            Some("allow") => UnderscoreHeaders::Allow,
            _ => UnderscoreHeaders::Drop,
        },
        escaped_slashes: read_escaped_slashes(r, &f).unwrap_or_default(),
        allowed_upgrades: read_upgrades(r, &f).unwrap_or_else(|| vec!["websocket".into()]),
        admin_token: r.string(&f, "adminToken").filter(|s| !s.is_empty()),
        admin_token_file: r.string(&f, "adminTokenFile").filter(|s| !s.is_empty()),
        file_key_lines: file_key_lines(root),
        base_dir: None,
        file: r.file.clone(),
    };
    if cfg.health_check_interval.is_zero() {
        r.err(
            f.key_line("healthCheckInterval"),
            "healthCheckInterval",
            "must be greater than 0",
        );
    }
    if cfg.max_header_size < 1024 {
        r.err(
            f.key_line("maxHeaderSize"),
            "maxHeaderSize",
            "must be at least 1k",
        );
    }
    let default_lb = read_lb(r, &f).unwrap_or(LoadBalancing::RoundRobin);
    cfg.timeouts = read_timeouts(r, f.get("timeouts"), "timeouts", &cfg.timeouts);
    for (p, line) in r.string_list(&f, "trustedProxies").unwrap_or_default() {
        if parse_cidr(&p).is_none() {
            r.err(
                line,
                "trustedProxies",
                format!("expected an IP address or CIDR, found {p:?}"),
            );
        }
        cfg.trusted_proxies.push(p);
    }
    cfg.rate_limiting = f
        .get("rateLimiting")
        .map(|n| read_rate_limit(r, n, "rateLimiting"));
    cfg.authentication = read_auth(r, f.get("authentication"));
    if let Some(n) = f.get("tls") {
        let tf = r.fields(n, "tls", &["enabled", "httpsPort", "certFile", "keyFile"]);
        cfg.tls.enabled = r.bool(&tf, "enabled").unwrap_or(false);
        if let Some(p) = r.port(&tf, "httpsPort") {
            cfg.tls.https_port = p;
        }
        if let Some(c) = r.string(&tf, "certFile") {
            cfg.tls.cert_file = c;
        }
        if let Some(k) = r.string(&tf, "keyFile") {
            cfg.tls.key_file = k;
        }
    }
    cfg.redis = f.get("redis").map(|n| read_redis(r, n));
    cfg.consul = read_consul(r, f.get("consul"));
    if let Some(items) = r.list(&f, "services") {
        let mut names = HashSet::new();
        let mut routes = HashSet::new();
        for (i, n) in items.iter().enumerate() {
            let path = format!("services[{i}]");
            let mut svc = read_service(r, n, &path, &cfg);
            if !svc_has_key(n, "loadBalancing") {
                svc.load_balancing = default_lb;
            }
            if !svc.name.is_empty() && !names.insert(svc.name.clone()) {
                r.err(
                    svc.line,
                    &format!("{path}.name"),
                    format!("duplicate service name {:?}", svc.name),
                );
            }
            let route_key = (
                svc.path.clone(),
                svc.path_type,
                svc.hosts.clone(),
                svc.methods.clone(),
            );
            if !svc.path.is_empty() && !routes.insert(route_key) {
                r.err(
                    svc.line,
                    &format!("{path}.path"),
                    format!(
                        "another service already routes {:?} with the same hosts and methods",
                        svc.path
                    ),
                );
            }
            let auth_on = svc.authentication.unwrap_or(cfg.authentication.enabled);
            if let Some(q) = &svc.quota {
                if q.enabled && q.key == "consumer" && !auth_on {
                    r.err(
                        svc.line,
                        &format!("{path}.quota"),
                        format!(
                            "service {:?}: a quota keyed by consumer needs authentication on this route",
                            svc.name
                        ),
                    );
                }
            }
            let rl = svc.rate_limiting.as_ref().or(cfg.rate_limiting.as_ref());
            if let Some(rl) = rl {
                if rl.enabled && rl.key == "consumer" && !auth_on {
                    r.err(
                        svc.line,
                        &format!("{path}.rateLimiting"),
                        format!(
                            "service {:?}: a rate limit keyed by consumer needs authentication on this route",
                            svc.name
                        ),
                    );
                }
            }
            cfg.services.push(svc);
        }
    }
    if cfg.tls.enabled && cfg.tls.https_port == cfg.gateway_port {
        r.err(
            f.key_line("tls"),
            "tls.httpsPort",
            "must differ from gatewayPort",
        );
    }
    if cfg.admin_token.is_some() && cfg.admin_token_file.is_some() {
        r.err(
            f.key_line("adminTokenFile"),
            "adminTokenFile",
            "set adminToken or adminTokenFile, not both",
        );
    }
    if !cfg.admin_bind.is_loopback() && !cfg.has_admin_token_source() {
        r.err(
            f.key_line("adminBind"),
            "adminBind",
            format!(
                "the admin listener on {} (not a loopback address) needs a token: set adminToken, adminTokenFile or the {ADMIN_TOKEN_ENV} environment variable",
                cfg.admin_bind
            ),
        );
    }
    if cfg.admin_port == cfg.gateway_port && cfg.admin_port != 0 {
        r.err(
            f.key_line("adminPort"),
            "adminPort",
            "must differ from gatewayPort (the admin listener is never served on the public port)",
        );
    }
    cfg
}

/// Lines of the keys that name files, from the YAML tree (defaults have none: their problems
/// are reported at the line of the enclosing block, or line 1).
fn file_key_lines(root: &Node) -> std::collections::BTreeMap<String, usize> {
    let mut out = std::collections::BTreeMap::new();
    let yaml::Kind::Map(top) = &root.kind else {
        return out;
    };
    for (k, line, v) in top {
        match (k.as_str(), &v.kind) {
            ("adminTokenFile", _) => {
                out.insert(k.clone(), *line);
            }
            ("tls" | "authentication", yaml::Kind::Map(m)) => {
                out.insert(k.clone(), *line);
                for (k2, l2, v2) in m {
                    let key = format!("{k}.{k2}");
                    if let yaml::Kind::Seq(items) = &v2.kind {
                        for (i, item) in items.iter().enumerate() {
                            out.insert(format!("{key}[{i}]"), item.line);
                        }
                    }
                    out.insert(key, *l2);
                }
            }
            _ => {}
        }
    }
    out
}

impl Config {
    /// The line of a file-naming key, else of its block, else 1.
    pub fn line_of(&self, key: &str) -> usize {
        let block = key.split('.').next().unwrap_or(key);
        self.file_key_lines
            .get(key)
            .or_else(|| self.file_key_lines.get(block))
            .copied()
            .unwrap_or(1)
    }
}

/// The environment variable read for the admin token when the config names none.
pub const ADMIN_TOKEN_ENV: &str = "HEXGATE_ADMIN_TOKEN";

impl Config {
    /// Whether an admin token is configured: `adminToken`, `adminTokenFile`, or the environment.
    pub fn has_admin_token_source(&self) -> bool {
        self.admin_token.is_some()
            || self.admin_token_file.is_some()
            || std::env::var(ADMIN_TOKEN_ENV).is_ok_and(|v| !v.trim().is_empty())
    }

    /// The admin token: `adminToken`, else the first line of `adminTokenFile` (relative to the
    /// config's directory), else `$HEXGATE_ADMIN_TOKEN`; None when none is set.
    pub fn admin_token_value(&self) -> Result<Option<String>, String> {
        if let Some(t) = &self.admin_token {
            return Ok(Some(t.clone()));
        }
        if let Some(file) = &self.admin_token_file {
            let path = match &self.base_dir {
                Some(dir) if Path::new(file).is_relative() => dir.join(file),
                _ => std::path::PathBuf::from(file),
            };
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("adminTokenFile {}: {e}", path.display()))?;
            let token = text.lines().next().unwrap_or("").trim().to_string();
            if token.is_empty() {
                return Err(format!(
                    "adminTokenFile {}: the file is empty",
                    path.display()
                ));
            }
            return Ok(Some(token));
        }
        Ok(std::env::var(ADMIN_TOKEN_ENV)
            .ok()
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty()))
    }
}

fn svc_has_key(n: &Node, key: &str) -> bool {
    matches!(&n.kind, yaml::Kind::Map(m) if m.iter().any(|(k, _, v)| k == key && !v.is_null()))
}

/// Parses "10.0.0.0/8" or "127.0.0.1" into (network, prefix length).
pub fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (ip, len) = match s.split_once('/') {
        Some((ip, len)) => (ip.parse::<IpAddr>().ok()?, len.parse::<u8>().ok()?),
        None => {
            let ip = s.parse::<IpAddr>().ok()?;
            (ip, if ip.is_ipv4() { 32 } else { 128 })
        }
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (len <= max).then_some((ip, len))
}

#[cfg(test)]
mod tests;
