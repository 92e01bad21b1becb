//! The validated config's types, with their defaults applied by the reader.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

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

/// How a backend is spoken to, from its URL's scheme: `http://` (HTTP/1.1), `https://` (TLS,
/// HTTP/2 or HTTP/1.1 by ALPN) or `h2c://` (cleartext HTTP/2 with prior knowledge).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    #[default]
    Http,
    Https,
    H2c,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
            Scheme::H2c => "h2c",
        }
    }

    /// The scheme a URL or a Consul instance names: `http`, `https`, `h2c`, or `grpc` (gRPC
    /// without TLS, which is h2c).
    pub fn parse(s: &str) -> Option<Scheme> {
        match s.to_ascii_lowercase().as_str() {
            "http" => Some(Scheme::Http),
            "https" => Some(Scheme::Https),
            "h2c" | "grpc" => Some(Scheme::H2c),
            _ => None,
        }
    }

    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Https => 443,
            Scheme::Http | Scheme::H2c => 80,
        }
    }
}

/// A backend address, `scheme://host:port`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct BackendAddr {
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
}

impl BackendAddr {
    pub fn authority(&self) -> String {
        hexgate_http::httpc::authority(&self.host, self.port)
    }
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme.as_str(), self.authority())
    }
}

/// A credential a route accepts (`authentication.methods`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum AuthMethod {
    Jwt,
    ApiKey,
}

/// `apiKeys`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeys {
    /// The header name, lower case.
    pub header: String,
    /// `apiKeys.file`; empty when the keys come from `consul_key`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub file: String,
    /// `apiKeys.consulKey`: the Consul KV key holding the key list.
    pub consul_key: Option<String>,
}

/// `upstreamProtocol`: which HTTP version a service's backends are spoken to in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum UpstreamProtocol {
    /// `http://` HTTP/1.1, `h2c://` HTTP/2, `https://` by ALPN (h2 when the backend offers it).
    #[default]
    Auto,
    /// HTTP/1.1 only (`h2c://` backends are refused).
    Http1,
    /// HTTP/2 only: `http://` backends are spoken to as h2c, `https://` ones must agree on h2.
    Http2,
}

/// `upstreamTls`: how a service's `https://` backends are verified and what it presents.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamTls {
    /// PEM CA certificates trusted besides the system roots.
    pub ca_file: Option<String>,
    /// SNI and the name verified (default: the backend's host).
    pub server_name: Option<String>,
    /// Client certificate chain and key (mTLS); both or neither.
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    pub insecure_skip_verify: bool,
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

/// What a limit counts by (`key`): `ip`, `consumer` or `header:NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitKey {
    Ip,
    Consumer,
    Header(http::HeaderName),
}

impl LimitKey {
    /// The key as written in config.yaml; None when it is none of the three forms.
    pub fn parse(s: &str) -> Option<LimitKey> {
        match s {
            "ip" => Some(LimitKey::Ip),
            "consumer" => Some(LimitKey::Consumer),
            _ => {
                let h = s.strip_prefix("header:").filter(|h| !h.is_empty())?;
                http::HeaderName::from_bytes(h.as_bytes())
                    .ok()
                    .map(LimitKey::Header)
            }
        }
    }
}

impl serde::Serialize for LimitKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            LimitKey::Ip => s.serialize_str("ip"),
            LimitKey::Consumer => s.serialize_str("consumer"),
            LimitKey::Header(h) => s.serialize_str(&format!("header:{h}")),
        }
    }
}

/// `redis.failureMode`: what a limit check does when Redis fails.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureMode {
    /// Fall back to this instance's in-memory limiter and keep serving.
    #[default]
    Open,
    /// Answer 503.
    Closed,
}

/// `rateLimitHeaders`: which RateLimit response fields are sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RateLimitHeaders {
    /// `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers).
    #[default]
    Draft,
    /// `RateLimit-Limit`, `-Remaining`, `-Reset`.
    Legacy,
    Both,
    None,
}

#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    pub enabled: bool,
    pub rate_per_second: f64,
    pub burst: u64,
    pub key: LimitKey,
}

#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Quota {
    pub enabled: bool,
    pub limit: u64,
    #[serde(with = "secs")]
    pub period: Duration,
    pub key: LimitKey,
}

/// `plans.NAME`: a plan's limits, counted per consumer (the name is the map key).
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    /// `priority`: under `maxInFlight` overload, lower priorities are refused first.
    pub priority: u32,
    /// Keyed by consumer, enabled.
    pub rate_limiting: Option<RateLimit>,
    /// Keyed by consumer, enabled.
    pub quota: Option<Quota>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
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
    /// `planClaim`: the JWT claim naming the consumer's plan.
    pub plan_claim: Option<String>,
    /// `defaultPlan`: the plan of consumers whose credential names none.
    pub default_plan: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Tls {
    pub enabled: bool,
    pub https_port: u16,
    pub cert_file: String,
    pub key_file: String,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
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
    pub failure_mode: FailureMode,
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
    /// `upstreamTls` (None: system roots, SNI from the backend's host, no client certificate).
    pub upstream_tls: Option<UpstreamTls>,
    pub upstream_protocol: UpstreamProtocol,
    pub consul_service_name: Option<String>,
    pub consul_tags: Vec<String>,
    pub consul_datacenter: Option<String>,
    pub load_balancing: LoadBalancing,
    pub timeouts: Timeouts,
    pub retries: u32,
    pub health_check_path: String,
    pub max_body_size: Option<u64>,
    pub authentication: Option<bool>,
    /// `authentication.methods` (default `[jwt]`).
    pub auth_methods: Vec<AuthMethod>,
    /// `requireScopes`.
    pub require_scopes: Vec<String>,
    /// `plans`: whether the consumer's plan limits apply on this route (when authenticated).
    pub plans: bool,
    /// Traffic policies: the service's own keys, else the top-level defaults.
    pub policies: crate::Policies,
    /// `rewrite`.
    pub rewrite: Option<crate::Rewrite>,
    /// `split`: named pools instead of `backends`.
    pub split: Vec<crate::Split>,
    pub rate_limiting: Option<RateLimit>,
    pub quota: Option<Quota>,
    /// `escapedSlashes` for this route (default: the top-level value).
    pub escaped_slashes: EscapedSlashes,
    /// `allowedUpgrades`: the `Upgrade` tokens tunnelled on this route, lower-case.
    pub allowed_upgrades: Vec<String>,
}

/// What `accessLog.format` writes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    /// The seed's line: `IP "METHOD PATH VERSION" STATUS TIMEms service=S request_id=R`.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `accessLog`. `true`/`false` (the seed's form) is `{enabled, format: text}` on stdout; the
/// mapping form defaults to `enabled: true, format: json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AccessLog {
    pub enabled: bool,
    pub format: AccessLogFormat,
    /// `accessLog.path` as written; `None` (absent, empty or `-`) is stdout.
    pub path: Option<String>,
}

impl AccessLog {
    /// The file written to, a relative path taken from `base_dir` (the config's directory);
    /// `None` is stdout.
    pub fn file(&self, base_dir: Option<&std::path::Path>) -> Option<std::path::PathBuf> {
        let p = std::path::Path::new(self.path.as_deref()?);
        Some(match base_dir {
            Some(dir) if p.is_relative() => dir.join(p),
            _ => p.to_path_buf(),
        })
    }
}

/// How spans reach the collector (`tracing.otlpEndpoint`'s scheme).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OtlpProtocol {
    /// OTLP/HTTP with protobuf bodies (`http://`, `https://`).
    Http,
    /// OTLP/gRPC (`grpc://`, `grpcs://`).
    Grpc,
}

/// `tracing`: OpenTelemetry traces exported over OTLP.
#[derive(Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Tracing {
    /// `otlpEndpoint` as written (credentials in it are refused).
    pub otlp_endpoint: String,
    #[serde(skip)]
    pub protocol: OtlpProtocol,
    /// `https://` or `grpcs://`.
    #[serde(skip)]
    pub tls: bool,
    #[serde(skip)]
    pub host: String,
    #[serde(skip)]
    pub port: u16,
    /// The request path: the OTLP/HTTP path (`/v1/traces` added), or the gRPC method's.
    #[serde(skip)]
    pub path: String,
    pub service_name: String,
    pub sample_ratio: f64,
    /// `headers`, names lower-case; the values are secrets (shown as `<redacted>`).
    #[serde(serialize_with = "redact_values")]
    pub headers: Vec<(String, String)>,
}

/// The gRPC method OTLP/gRPC exports call.
pub const OTLP_GRPC_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// Header values are credentials (`authorization`): never printed, not even by `{:?}`.
impl std::fmt::Debug for Tracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracing")
            .field("otlp_endpoint", &self.otlp_endpoint)
            .field("protocol", &self.protocol)
            .field("path", &self.path)
            .field("service_name", &self.service_name)
            .field("sample_ratio", &self.sample_ratio)
            .field(
                "headers",
                &self.headers.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .finish()
    }
}

fn redact_values<S: serde::Serializer>(v: &[(String, String)], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut m = s.serialize_map(Some(v.len()))?;
    for (k, _) in v {
        m.serialize_entry(k, "<redacted>")?;
    }
    m.end()
}

/// A validated configuration, defaults applied. Produced by [`crate::parse`].
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
    pub rate_limit_headers: RateLimitHeaders,
    pub authentication: Authentication,
    pub api_keys: Option<ApiKeys>,
    /// `plans`, by name.
    pub plans: std::collections::BTreeMap<String, Plan>,
    /// The top-level traffic policies: every service's defaults.
    pub policies: crate::Policies,
    pub tls: Tls,
    pub redis: Option<Redis>,
    pub consul: Consul,
    pub timeouts: Timeouts,
    pub retries: u32,
    pub max_header_size: u64,
    pub max_body_size: Option<u64>,
    pub max_connections: u64,
    /// `accessLog`: `true`/`false` or the mapping.
    pub access_log: AccessLog,
    /// `tracing`, when given and enabled.
    pub tracing: Option<Tracing>,
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

pub(crate) mod secs {
    use std::time::Duration;
    pub(crate) fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}ms", d.as_millis()))
    }
}

pub(crate) mod secs_opt {
    use std::time::Duration;
    pub(crate) fn serialize<S: serde::Serializer>(
        d: &Option<Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&format!("{}ms", d.as_millis())),
            None => s.serialize_none(),
        }
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
}
