//! One declaration per config key: its name, kind, default and meaning. The reader takes the keys
//! it accepts (and the ranges and words it checks) from here, the README's reference tables are
//! rendered from here (`reference`), and so is the JSON Schema (`schema`).

/// What a key holds. Every key may also be given as null (`key:` or `key: ~`), which the reader
/// treats as absent.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// Text; any scalar is read as its text.
    String,
    /// A whole number in `min..=max`; quoted digits are accepted too.
    Int { min: u64, max: u64 },
    /// A port, 0..=65535, given as `8000` or `"8000"`.
    Port,
    /// A number greater than `min_exclusive`; quoted numbers are accepted too.
    Number { min_exclusive: f64 },
    /// A number from 0 to 1, both included; quoted numbers are accepted too.
    Fraction,
    /// `true` or `false` (unquoted).
    Bool,
    /// A Go duration (`250ms`, `90s`, `1h30m`) plus `d` for days; a bare integer means seconds.
    Duration,
    /// Bytes, or a number with a `k`, `m` or `g` (binary) suffix.
    Size,
    /// An IPv4 or IPv6 address.
    Ip,
    /// One of these words (case-sensitive).
    Enum(&'static [&'static str]),
    /// A list of scalars.
    List(Item),
    /// A mapping of any names to scalars.
    Map,
    /// A mapping with the declared keys only.
    Block(&'static [KeyDecl]),
    /// `true` or `false` (unquoted), or a mapping with the declared keys only: a switch with
    /// settings (`accessLog: true` or `accessLog: {format: json, path: ...}`).
    Switch(&'static [KeyDecl]),
    /// A list of mappings with the declared keys only.
    Blocks(&'static [KeyDecl]),
    /// A mapping of names (letters, digits, `-`, `_`, `.`) to mappings with the declared keys
    /// only; paths write the name as `NAME` (`plans.NAME.quota`).
    Named(&'static [KeyDecl]),
}

/// What the items of a [`Kind::List`] may be.
#[derive(Debug, Clone, Copy)]
pub enum Item {
    /// Any scalar (read as text; the reader checks the form).
    Any,
    /// One of these words, case-sensitive.
    OneOf(&'static [&'static str]),
    /// One of these words in any case.
    OneOfAnyCase(&'static [&'static str]),
}

/// The default of a key, as the reference shows it.
#[derive(Debug, Clone, Copy)]
pub enum DefaultValue {
    /// No value: the feature is off or the value is unset.
    None,
    /// A literal value, written as in YAML (`"8000"`, `2s`, `[websocket]`).
    Value(&'static str),
    /// A description (`top-level value`, `` `CONSUL_HTTP_ADDR` or ... ``); not a literal.
    Text(&'static str),
}

/// One config key.
#[derive(Debug, Clone, Copy)]
pub struct KeyDecl {
    /// The key's name in its mapping (camelCase).
    pub name: &'static str,
    pub kind: Kind,
    pub default: DefaultValue,
    /// The reader refuses a mapping without this key.
    pub required: bool,
    /// What it means (Markdown, one line); empty for a block that needs no row of its own.
    pub doc: &'static str,
}

const fn key(name: &'static str, kind: Kind, default: DefaultValue, doc: &'static str) -> KeyDecl {
    KeyDecl {
        name,
        kind,
        default,
        required: false,
        doc,
    }
}

const fn required(name: &'static str, kind: Kind, doc: &'static str) -> KeyDecl {
    KeyDecl {
        name,
        kind,
        default: DefaultValue::None,
        required: true,
        doc,
    }
}

use self::DefaultValue::{None as NONE, Text, Value};

/// HTTP methods a service may match (`methods`), in any case.
pub const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT",
];

/// JWT algorithms that may be allowed (`authentication.algorithms`): asymmetric only.
pub const ALGORITHMS: &[&str] = &[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
];

/// The keys at the top of a config file.
#[rustfmt::skip]
pub static TOP: &[KeyDecl] = &[
    key("gatewayPort", Kind::Port, Value("\"8000\""), "public listener: HTTP/1.1 and HTTP/2 (h2c prior knowledge); with `tls.enabled`, a 301 redirect to HTTPS"),
    key("gatewayBind", Kind::Ip, Value("0.0.0.0"), "address of the public listeners"),
    key("adminPort", Kind::Port, Value("\"9901\""), "admin listener (`/healthz`, `/readyz`, `/metrics`, `/admin/*`); must differ from `gatewayPort`"),
    key("adminBind", Kind::Ip, Value("127.0.0.1"), "admin address; loopback unless you say otherwise"),
    key("healthCheckInterval", Kind::Duration, Value("5"), "seconds (or a duration) between active health checks of static backends; more than 0"),
    key("healthCheckPath", Kind::String, Value("/health"), "path probed by active health checks (per service too)"),
    key("healthCheckTimeout", Kind::Duration, Value("2s"), "time a health check may take"),
    key("services", Kind::Blocks(SERVICE), Value("[]"), "the routes, see below"),
    key("loadBalancing", Kind::Enum(LOAD_BALANCING), Value("roundRobin"), "default for services: `roundRobin` or `leastRequest` (power of two choices on in-flight requests)"),
    key("timeouts", Kind::Block(TIMEOUTS), NONE, ""),
    key("retries", Kind::Int { min: 0, max: 10 }, Value("2"), "extra attempts on another backend when a connect fails or a request was never written"),
    key("maxHeaderSize", Kind::Size, Value("64k"), "header fields, each counted as `name: value` plus CRLF (name + value + 4 bytes), HTTP/1 and HTTP/2 alike; beyond it 431. The request line may take 8 KiB more. At least `1k`"),
    key("maxHeaderCount", Kind::Int { min: 1, max: 10_000 }, Value("100"), "header fields per request (Host included); beyond it 431"),
    key("underscoreHeaders", Kind::Enum(&["drop", "reject", "allow"]), Value("drop"), "header names containing `_`: `drop` (removed before anything reads the request, as nginx's `underscores_in_headers off`), `reject` (400), `allow` (forwarded). CGI, WSGI and PHP backends read `X_Consumer_Id` as `X-Consumer-Id`"),
    key("escapedSlashes", Kind::Enum(ESCAPED_SLASHES), Value("reject"), "default for services, see below"),
    key("allowedUpgrades", Kind::List(Item::Any), Value("[websocket]"), "default for services, see below"),
    key("adminToken", Kind::String, NONE, "bearer token required on every admin path but `/healthz` and `/readyz`; shown as `<redacted>` in `/admin/config`"),
    key("adminTokenFile", Kind::String, NONE, "file whose first line is the admin token (relative to the config's directory); `HEXGATE_ADMIN_TOKEN` in the environment is used when neither key is set. A token is required when `adminBind` is not a loopback address. Not together with `adminToken`"),
    key("maxBodySize", Kind::Size, NONE, "default per-service body limit: a larger declared Content-Length gets 413 before anything is forwarded; a chunked body is counted while it streams and the request ends in 413 when it goes over"),
    key("maxConnections", Kind::Int { min: 1, max: 10_000_000 }, Value("20000"), "client connections per instance; beyond it new connections wait"),
    key("tracing", Kind::Block(TRACING), NONE, "OpenTelemetry traces exported over OTLP, see [Tracing and logs](#tracing-and-logs)"),
    key("accessLog", Kind::Switch(ACCESS_LOG), Value("false"), "one line per request: `true` is the seed's text line on stdout (`{enabled: true, format: text}`); a mapping sets the keys below"),
    key("shutdownTimeout", Kind::Duration, Value("30s"), "how long SIGTERM/SIGINT waits for in-flight requests"),
    key("trustedProxies", Kind::List(Item::Any), Value("[]"), "IPs/CIDRs whose `X-Forwarded-*` headers are kept and appended to; from anyone else they are replaced"),
    key("rateLimitHeaders", Kind::Enum(&["draft", "legacy", "both", "none"]), Value("draft"), "RateLimit response fields: `draft` (`RateLimit-Policy` + `RateLimit`, draft-ietf-httpapi-ratelimit-headers), `legacy` (`RateLimit-Limit`/`-Remaining`/`-Reset`), `both`, `none`"),
    key("tls", Kind::Block(TLS), NONE, ""),
    key("authentication", Kind::Block(AUTHENTICATION), NONE, ""),
    key("plans", Kind::Named(PLAN), Value("{}"), "consumer plans by name (`free`, `pro`): each plan's limits apply per consumer on authenticated routes, see [Plans](#plans)"),
    key("apiKeys", Kind::Block(API_KEYS), NONE, "API keys for machine clients, accepted on routes whose `authentication.methods` include `apiKey`"),
    key("rateLimiting", Kind::Block(RATE_LIMIT), Text("off"), "top level = one limit shared by all routes per key, per service = that route's own"),
    key("redis", Kind::Block(REDIS), NONE, ""),
    key("consul", Kind::Block(CONSUL), NONE, ""),
    key("cors", Kind::Block(CORS), NONE, "default for services: CORS answered by the gateway, see [Traffic policies](#traffic-policies)"),
    key("requestHeaders", Kind::Block(REQUEST_HEADER_RULES), NONE, "default for services: header rules on the request sent upstream"),
    key("responseHeaders", Kind::Block(RESPONSE_HEADER_RULES), NONE, "default for services: header rules on the response sent to the client"),
    key("ipAllow", Kind::List(Item::Any), Value("[]"), "default for services: only these client addresses (IPs or CIDRs, IPv4 and IPv6; the client address as for rate limits), else 403"),
    key("ipDeny", Kind::List(Item::Any), Value("[]"), "default for services: client addresses refused with 403 (checked before `ipAllow`)"),
    key("circuitBreaker", Kind::Block(CIRCUIT_BREAKER), Text("passive ejection on gateway-side failures"), "default for services: ejection of failing backends"),
    key("maxInFlight", Kind::Int { min: 1, max: 10_000_000 }, NONE, "default for services: requests in flight per service and instance; beyond it 503 at once with `Retry-After`"),
    key("retryOn", Kind::List(Item::OneOf(RETRY_ON)), Value("[connect-failure]"), "default for services: what is retried on another backend (within `retries`)"),
    key("retryBudget", Kind::Block(RETRY_BUDGET), NONE, "default for services: the share of requests that may be retries"),
];

/// `tracing`.
#[rustfmt::skip]
pub static TRACING: &[KeyDecl] = &[
    key("enabled", Kind::Bool, Value("true"), "export traces (giving the block turns it on)"),
    required("otlpEndpoint", Kind::String, "the collector: `http://` or `https://` for OTLP/HTTP (protobuf; `/v1/traces` is added unless the path already ends with it), `grpc://` or `grpcs://` (TLS) for OTLP/gRPC (port 4317 when none is given)"),
    key("serviceName", Kind::String, Value("hexgate"), "the `service.name` resource attribute of every span"),
    key("sampleRatio", Kind::Fraction, Value("1"), "share of new traces kept, decided on the trace id; parent-based: a request whose `traceparent` says sampled is always kept, one that says not sampled never"),
    key("headers", Kind::Map, Value("{}"), "header fields sent with every export (`authorization` for hosted collectors); values are shown as `<redacted>`"),
];

/// `accessLog` given as a mapping.
#[rustfmt::skip]
pub static ACCESS_LOG: &[KeyDecl] = &[
    key("enabled", Kind::Bool, Value("true"), "write the access log (giving the mapping turns it on)"),
    key("format", Kind::Enum(ACCESS_LOG_FORMATS), Value("json"), "`json`: one JSON object per line; `text`: the seed's line (what `accessLog: true` writes)"),
    key("path", Kind::String, Text("stdout"), "file the lines are appended to, relative to the config's directory; `-` means stdout. Its directory must exist. Reopened on SIGUSR1 (logrotate's `create`); a reload that changes it writes to the new file"),
];

/// `accessLog.format` words.
pub const ACCESS_LOG_FORMATS: &[&str] = &["json", "text"];

/// `retryOn` words.
pub const RETRY_ON: &[&str] = &["connect-failure", "reset", "500", "502", "503", "504"];

/// `cors` (top level and per service).
#[rustfmt::skip]
pub static CORS: &[KeyDecl] = &[
    key("allowOrigins", Kind::List(Item::Any), Value("[]"), "origins allowed: `https://app.example.com`, `https://*.example.com` (any subdomain) or `*`; another origin gets no CORS fields"),
    key("allowMethods", Kind::List(Item::OneOfAnyCase(METHODS)), Value("[GET, HEAD, POST]"), "methods a preflight may ask for"),
    key("allowHeaders", Kind::List(Item::Any), Value("[]"), "request headers a preflight may ask for"),
    key("exposeHeaders", Kind::List(Item::Any), Value("[]"), "response headers scripts may read (`Access-Control-Expose-Headers`)"),
    key("allowCredentials", Kind::Bool, Value("false"), "send `Access-Control-Allow-Credentials: true`; not with the origin `*` (refused at load)"),
    key("maxAge", Kind::Duration, NONE, "how long a browser may cache a preflight's answer (`Access-Control-Max-Age`)"),
];

/// `requestHeaders` (top level and per service).
#[rustfmt::skip]
pub static REQUEST_HEADER_RULES: &[KeyDecl] = &[
    key("set", Kind::Map, Value("{}"), "name → value, replacing the field; values may use `${consumer}`, `${request_id}`, `${client_ip}`, `${plan}`"),
    key("add", Kind::Map, Value("{}"), "name → value, appended to the field's values"),
    key("remove", Kind::List(Item::Any), Value("[]"), "names removed. Hop-by-hop fields, `Host`, `Content-Length` and the gateway's own (`X-Consumer-Id`, `X-Request-Id`, `X-Forwarded-For/-Proto/-Host`, `forwardClaims` headers) cannot be named"),
];

/// `responseHeaders` (top level and per service).
#[rustfmt::skip]
pub static RESPONSE_HEADER_RULES: &[KeyDecl] = &[
    key("set", Kind::Map, Value("{}"), "as for `requestHeaders`"),
    key("add", Kind::Map, Value("{}"), "as for `requestHeaders`"),
    key("remove", Kind::List(Item::Any), Value("[]"), "names removed (`Server`, `X-Powered-By`). Hop-by-hop fields, `Content-Length` and `X-Request-Id` cannot be named"),
];

/// `services[].rewrite`.
#[rustfmt::skip]
pub static REWRITE: &[KeyDecl] = &[
    required("regex", Kind::String, "regular expression (RE2 syntax, linear time) matched against the normalised path after routing"),
    required("replacement", Kind::String, "the new path: `$1` or `${name}` name captures; normalised again (an invalid result is a 500, never forwarded)"),
];

/// `services[].split[]`.
#[rustfmt::skip]
pub static SPLIT: &[KeyDecl] = &[
    required("name", Kind::String, "the split's name (metrics carry it)"),
    required("weight", Kind::Int { min: 0, max: 1_000_000 }, "share of the requests no match claims"),
    required("backends", Kind::List(Item::Any), "this split's pool, with its own health and balancing"),
    key("match", Kind::Block(SPLIT_MATCH), NONE, "requests with these headers or cookies always go here"),
];

/// `services[].split[].match`.
#[rustfmt::skip]
pub static SPLIT_MATCH: &[KeyDecl] = &[
    key("headers", Kind::Map, Value("{}"), "header name → exact value"),
    key("cookies", Kind::Map, Value("{}"), "cookie name → exact value"),
];

/// `circuitBreaker` (top level and per service).
#[rustfmt::skip]
pub static CIRCUIT_BREAKER: &[KeyDecl] = &[
    key("consecutive5xx", Kind::Int { min: 1, max: 1000 }, Value("5"), "consecutive 5xx answers or gateway-side failures that eject a backend"),
    key("ejectFor", Kind::Duration, Value("30s"), "the first ejection; doubled while the backend keeps failing (up to 10x)"),
    key("maxEjectedPercent", Kind::Int { min: 0, max: 100 }, Value("50"), "never more than this share of a pool ejected at once"),
];

/// `retryBudget` (top level and per service).
#[rustfmt::skip]
pub static RETRY_BUDGET: &[KeyDecl] = &[
    key("percent", Kind::Number { min_exclusive: 0.0 }, Value("20"), "retries at most this percentage of the service's requests (over the last second)"),
    key("minPerSecond", Kind::Int { min: 0, max: 1_000_000 }, Value("5"), "retries allowed per second whatever the traffic"),
];

const LOAD_BALANCING: &[&str] = &["roundRobin", "leastRequest"];
const ESCAPED_SLASHES: &[&str] = &["reject", "keep", "decode"];

/// `timeouts` (top level).
#[rustfmt::skip]
pub static TIMEOUTS: &[KeyDecl] = &[
    key("connect", Kind::Duration, Value("2s"), "TCP connect to a backend"),
    key("request", Kind::Duration, Value("30s"), "from forwarding to the backend's response headers, retries included; then 504. The backend is only late once it has had `timeouts.request` after the whole request, body included, was sent (the wait is extended once, to the body's completion plus `timeouts.request`); a body still arriving when it runs out is the client's 408"),
    key("idle", Kind::Duration, Value("60s"), "an HTTP/1 keep-alive connection waiting for its next request, or an HTTP/2 connection that neither began a request nor sent a response frame for this long, is closed (HTTP/2: GOAWAY, then closed after one more `idle` if its streams are still stalled); keep it above the idle timeout of the pool in front (nginx `keepalive_timeout` in its `upstream` block)"),
    key("headerRead", Kind::Duration, Value("10s"), "a client must send its request headers within this (from the connection's start, whatever it sent, or from the first byte of a later request); a request body must make progress at least this often (else 408)"),
];

/// `services[].timeouts`: per-route overrides.
#[rustfmt::skip]
pub static SERVICE_TIMEOUTS: &[KeyDecl] = &[
    key("connect", Kind::Duration, Text("top-level value"), "overrides `timeouts.connect`"),
    key("request", Kind::Duration, Text("top-level value"), "overrides `timeouts.request`"),
    key("idle", Kind::Duration, Text("top-level value"), "accepted but not used per route: connections, not routes, go idle, so the top-level `timeouts.idle` applies"),
    key("headerRead", Kind::Duration, Text("top-level value"), "overrides `timeouts.headerRead` for this route's request bodies"),
];

/// `tls`.
#[rustfmt::skip]
pub static TLS: &[KeyDecl] = &[
    key("enabled", Kind::Bool, Value("false"), "serve HTTPS (rustls, TLS 1.2/1.3, ALPN h2 and http/1.1) on `tls.httpsPort`"),
    key("httpsPort", Kind::Port, Value("\"8443\""), "HTTPS port; must differ from `gatewayPort`"),
    key("certFile", Kind::String, Value("./config/cert.pem"), "PEM certificate chain"),
    key("keyFile", Kind::String, Value("./config/key.pem"), "PEM private key"),
];

/// `authentication`.
#[rustfmt::skip]
pub static AUTHENTICATION: &[KeyDecl] = &[
    key("enabled", Kind::Bool, Value("false"), "require a JWT on every route (services may override); needs `publicKeyPath`, `publicKeys` or `jwksUrl`"),
    key("publicKeyPath", Kind::String, NONE, "PEM public key, SPKI (`PUBLIC KEY`) or PKCS#1 (`RSA PUBLIC KEY`); relative paths are tried from the working directory, then from the config file's directory"),
    key("publicKeys", Kind::List(Item::Any), Value("[]"), "more PEM files (key rotation): a token is accepted if any key verifies it"),
    key("jwksUrl", Kind::String, NONE, "JWK Set URL (http or https), fetched at start, refreshed on its `Cache-Control: max-age` (default 5 min) and when a token names an unknown `kid` (at most once per 5 s); the last good set is kept when a fetch fails"),
    key("algorithms", Kind::List(Item::OneOf(ALGORITHMS)), Value("[RS256]"), "allow-list, at least one; `none` and HMAC are never accepted"),
    key("issuer", Kind::String, NONE, "required `iss` when set"),
    key("audience", Kind::String, NONE, "required `aud` (string or array) when set"),
    key("leeway", Kind::Duration, Value("30s"), "clock skew allowed for `exp` and `nbf`"),
    key("requireExp", Kind::Bool, Value("true"), "refuse tokens without `exp`"),
    key("consumerClaim", Kind::String, Value("sub"), "claim that identifies the consumer (forwarded as `X-Consumer-Id`, used by quotas)"),
    key("forwardClaims", Kind::Map, Value("{}"), "claim → request header, e.g. `{role: X-Consumer-Role}`"),
    key("stripAuthorization", Kind::Bool, Value("false"), "remove the `Authorization` header before forwarding"),
    key("planClaim", Kind::String, NONE, "JWT claim naming the consumer's plan (an API key's plan comes from its entry); needs `plans`"),
    key("defaultPlan", Kind::String, NONE, "plan of consumers whose token or key names none; without it such consumers are refused (403 `plan_missing`) on routes that apply plans. Must name a plan"),
];

/// `rateLimiting` (top level and per service).
#[rustfmt::skip]
pub static RATE_LIMIT: &[KeyDecl] = &[
    key("enabled", Kind::Bool, Value("false"), "turn the limit on"),
    key("ratePerSecond", Kind::Number { min_exclusive: 0.0 }, Text("required when `enabled`"), "requests allowed per second, on average (may be fractional)"),
    key("burst", Kind::Int { min: 1, max: 1_000_000_000 }, Value("1"), "requests allowed at once on top of the rate"),
    key("key", Kind::String, Value("ip"), "what is counted: `ip`, `consumer` (needs authentication on the route), or `header:NAME`"),
];

/// `services[].quota`.
#[rustfmt::skip]
pub static QUOTA: &[KeyDecl] = &[
    key("enabled", Kind::Bool, Value("false"), "turn the quota on"),
    key("limit", Kind::Int { min: 1, max: u32::MAX as u64 }, Text("required when `enabled`"), "requests allowed per `period`"),
    key("period", Kind::Duration, Text("required when `enabled`"), "the window, e.g. `24h`, `1d`; at least `1s`"),
    key("key", Kind::String, Value("consumer"), "what is counted: `consumer`, `ip`, or `header:NAME`"),
];

/// `redis`.
#[rustfmt::skip]
pub static REDIS: &[KeyDecl] = &[
    key("address", Kind::String, NONE, "`host:port`; when set (or `cluster`), limits are shared by every instance through Redis; absent: in memory per instance"),
    key("cluster", Kind::List(Item::Any), Value("[]"), "Redis Cluster seed nodes `[\"host:port\", ...]` instead of `address`"),
    key("username", Kind::String, NONE, "connection settings: ACL user name"),
    key("password", Kind::String, Value("\"\""), "connection settings: password (shown as `<redacted>`)"),
    key("db", Kind::Int { min: 0, max: 15 }, Value("0"), "connection settings: database number"),
    key("tls", Kind::Bool, Value("false"), "connection settings: TLS, using rustls with the system roots (a private CA: set `SSL_CERT_FILE` to its certificate); single address only, refused with `cluster`"),
    key("timeout", Kind::Duration, Value("50ms"), "per limit call; beyond it the failure mode applies"),
    key("failureMode", Kind::Enum(&["open", "closed"]), Value("open"), "`open`: fall back to this instance's in-memory limiter and keep serving; `closed`: answer 503"),
    key("keyPrefix", Kind::String, Value("hexgate:"), "prefix of every Redis key"),
];

/// `consul`.
#[rustfmt::skip]
pub static CONSUL: &[KeyDecl] = &[
    key("address", Kind::String, Text("`CONSUL_HTTP_ADDR` or `http://127.0.0.1:8500`"), "Consul agent for discovery and registration: `host:port` or `http(s)://host:port`"),
    key("token", Kind::String, Text("`CONSUL_HTTP_TOKEN`"), "ACL token"),
    key("caCert", Kind::String, Text("`CONSUL_CACERT`"), "CA for https"),
    key("datacenter", Kind::String, NONE, "default datacenter of queries"),
    key("register", Kind::Bool, Value("false"), "register this instance as service `consul.serviceName` (ID unique per host and port, the admin port as its port, an HTTP check on `/healthz`), deregistered on graceful shutdown; Prometheus finds instances through it"),
    key("serviceName", Kind::String, Value("hexgate"), "name to register under"),
    key("advertiseAddress", Kind::String, Text("`adminBind`, or when that is `0.0.0.0` the local address used to reach Consul"), "address registered for this instance"),
];

/// `services[]`: one route.
#[rustfmt::skip]
pub static SERVICE: &[KeyDecl] = &[
    required("name", Kind::String, "unique; the `service` label in metrics; letters, digits, `-`, `_` or `.`"),
    required("path", Kind::String, "path prefix (`/users/`); the longest matching prefix wins. Starts with `/`, normalized (no dot segments, `//` or needless %-escapes), no `;`"),
    key("pathType", Kind::Enum(&["prefix", "exact"]), Value("prefix"), "`exact` matches the path only"),
    key("stripPath", Kind::Bool, Value("false"), "remove the prefix before forwarding (`/api/v1/items` → `/items`)"),
    key("hosts", Kind::List(Item::Any), Text("any"), "match only these hosts (`*.example.com` wildcards allowed); compared in canonical form (lower case, no trailing dot, port ignored), see [How requests are handled](#how-requests-are-handled)"),
    key("methods", Kind::List(Item::OneOfAnyCase(METHODS)), Text("any"), "match only these methods"),
    key("backends", Kind::List(Item::Any), Value("[]"), "static pool, `scheme://host:port` (no path): `http://` (HTTP/1.1), `https://` (TLS, verified; HTTP/2 when the backend offers `h2` by ALPN, else HTTP/1.1) or `h2c://` (cleartext HTTP/2, prior knowledge: gRPC without TLS); a service needs `backends` or `consulServiceName`"),
    key("upstreamTls", Kind::Block(UPSTREAM_TLS), NONE, "how `https://` backends (static or discovered) are verified and what the gateway presents to them"),
    key("upstreamProtocol", Kind::Enum(&["auto", "http1", "http2"]), Value("auto"), "`auto`: by scheme (`https://` by ALPN); `http1`: HTTP/1.1 only (`h2c://` backends refused); `http2`: HTTP/2 only (`http://` backends spoken to as h2c, `https://` ones must offer `h2`)"),
    key("consulServiceName", Kind::String, NONE, "pool discovered from Consul: the service's passing instances (`/v1/health/service/NAME?passing`, blocking queries), service address or else node address, `Weights.Passing` honoured by the balancer; may be combined with static `backends`"),
    key("consulTags", Kind::List(Item::Any), NONE, "discovery filter: only instances carrying all of these tags"),
    key("consulDatacenter", Kind::String, NONE, "discovery filter: the datacenter queried (default `consul.datacenter`)"),
    key("loadBalancing", Kind::Enum(LOAD_BALANCING), Text("top-level value"), "`roundRobin` or `leastRequest`"),
    key("timeouts", Kind::Block(SERVICE_TIMEOUTS), Text("top-level values"), "overrides of the top-level `timeouts`"),
    key("retries", Kind::Int { min: 0, max: 10 }, Text("top-level value"), "as above"),
    key("healthCheckPath", Kind::String, Text("top-level value"), "as above"),
    key("maxBodySize", Kind::Size, Text("top-level value"), "413 beyond it (declared or streamed)"),
    key("authentication", Kind::Block(SERVICE_AUTHENTICATION), NONE, ""),
    key("rateLimiting", Kind::Block(RATE_LIMIT), Text("top-level value"), "this route's own rate limit (`enabled: false` turns the global one off here); keys as in the top-level `rateLimiting`"),
    key("quota", Kind::Block(QUOTA), NONE, "requests per period, counted per key; a quota keyed by consumer on a route without authentication is an error"),
    key("escapedSlashes", Kind::Enum(ESCAPED_SLASHES), Text("top-level value (`reject`)"), "`%2F`, `%5C` or a raw `\\` in the path: `reject` (400, as Traefik's encoded-character filter), `keep` (forwarded as they came, never a separator for routing; for APIs with `%2F` in ids), `decode` (separators: decoded before normalisation and routing, and the request may only land on a route that decodes too). `%00` is always a 400"),
    key("cors", Kind::Block(CORS), Text("top-level value"), "CORS for this route"),
    key("requestHeaders", Kind::Block(REQUEST_HEADER_RULES), Text("top-level value"), "header rules on the request sent upstream"),
    key("responseHeaders", Kind::Block(RESPONSE_HEADER_RULES), Text("top-level value"), "header rules on the response"),
    key("rewrite", Kind::Block(REWRITE), NONE, "path rewrite (not with `stripPath`)"),
    key("ipAllow", Kind::List(Item::Any), Text("top-level value"), "only these client addresses"),
    key("ipDeny", Kind::List(Item::Any), Text("top-level value"), "client addresses refused"),
    key("split", Kind::Blocks(SPLIT), NONE, "weighted pools instead of `backends` (canary releases)"),
    key("circuitBreaker", Kind::Block(CIRCUIT_BREAKER), Text("top-level value"), "ejection of failing backends"),
    key("maxInFlight", Kind::Int { min: 1, max: 10_000_000 }, Text("top-level value"), "requests in flight on this route per instance"),
    key("retryOn", Kind::List(Item::OneOf(RETRY_ON)), Text("top-level value"), "what is retried"),
    key("retryBudget", Kind::Block(RETRY_BUDGET), Text("top-level value"), "the share of requests that may be retries"),
    key("plans", Kind::Bool, Value("true"), "apply the consumer's plan limits on this route (authenticated routes, when `plans` are configured); `false` opts out. The route's own `rateLimiting` and `quota` apply as well"),
    key("requireScopes", Kind::List(Item::Any), Value("[]"), "scopes a credential must grant (all of them) for this route: from a JWT's `scope` (space-separated) or `scp` (array) claim, or an API key's `scopes`; else 403 with `WWW-Authenticate: Bearer error=\"insufficient_scope\"`"),
    key("allowedUpgrades", Kind::List(Item::Any), Text("top-level value (`[websocket]`)"), "`Upgrade` protocols tunnelled on this route (tokens such as `websocket`, any case); other `Upgrade` requests are forwarded as ordinary requests without it"),
];

/// `services[].upstreamTls`.
#[rustfmt::skip]
pub static UPSTREAM_TLS: &[KeyDecl] = &[
    key("caFile", Kind::String, NONE, "PEM CA certificates trusted for this service's backends, besides the system roots; relative paths as for `publicKeyPath`; re-read at every reload"),
    key("serverName", Kind::String, Text("the backend's host"), "SNI sent and the name the backend's certificate must carry"),
    key("certFile", Kind::String, NONE, "PEM client certificate chain presented to backends that ask for one (mTLS); needs `keyFile`"),
    key("keyFile", Kind::String, NONE, "PEM private key of `certFile`"),
    key("insecureSkipVerify", Kind::Bool, Value("false"), "accept any backend certificate (no chain or name check): a warning is logged at every load"),
];

/// `services[].authentication`.
#[rustfmt::skip]
pub static SERVICE_AUTHENTICATION: &[KeyDecl] = &[
    key("enabled", Kind::Bool, Text("global switch"), "per-route override: public and protected routes side by side"),
    key("methods", Kind::List(Item::OneOf(&["jwt", "apiKey"])), Value("[jwt]"), "credentials accepted on this route: `jwt` (`Authorization: Bearer`), `apiKey` (the `apiKeys.header`); either one suffices"),
];

/// `plans.NAME`: one plan.
#[rustfmt::skip]
pub static PLAN: &[KeyDecl] = &[
    key("priority", Kind::Int { min: 0, max: 1000 }, Value("0"), "under `maxInFlight` overload, requests of lower-priority plans are refused first"),
    key("rateLimiting", Kind::Block(PLAN_RATE), NONE, "the plan's rate limit, per consumer, shared by every route that applies plans"),
    key("quota", Kind::Block(PLAN_QUOTA), NONE, "the plan's quota, per consumer, shared by every route that applies plans and by every instance"),
];

/// `plans.NAME.rateLimiting`.
#[rustfmt::skip]
pub static PLAN_RATE: &[KeyDecl] = &[
    required("ratePerSecond", Kind::Number { min_exclusive: 0.0 }, "requests allowed per second, on average"),
    key("burst", Kind::Int { min: 1, max: 1_000_000_000 }, Value("1"), "requests allowed at once on top of the rate"),
];

/// `plans.NAME.quota`.
#[rustfmt::skip]
pub static PLAN_QUOTA: &[KeyDecl] = &[
    required("limit", Kind::Int { min: 1, max: u32::MAX as u64 }, "requests allowed per `period`"),
    required("period", Kind::Duration, "the window, e.g. `24h`, `1d`; at least `1s`. A consumer moved to a plan with the same period keeps its count"),
];

/// `apiKeys`.
#[rustfmt::skip]
pub static API_KEYS: &[KeyDecl] = &[
    key("header", Kind::String, Value("X-Api-Key"), "request header carrying the key; removed before forwarding, on every route"),
    key("file", Kind::String, NONE, "YAML list of keys (see [API keys and scopes](#api-keys-and-scopes)); relative paths as for `publicKeyPath`; watched: a change is live within a second, a broken file keeps the last good set. Set `file` or `consulKey`"),
    key("consulKey", Kind::String, NONE, "Consul KV key holding the same YAML list (`consul` settings apply); followed with blocking queries, so a change is live on every instance within a second; a broken value keeps the last good set"),
];

/// One entry of the `apiKeys.file` list.
#[rustfmt::skip]
pub static API_KEY_ENTRY: &[KeyDecl] = &[
    required("id", Kind::String, "unique name of the key (logs and metrics name keys by this, never by the key)"),
    required("consumer", Kind::String, "the consumer, sent upstream as `X-Consumer-Id`"),
    key("plan", Kind::String, NONE, "the consumer's plan"),
    required("hash", Kind::String, "`sha256:` and the key's SHA-256 in 64 hex digits (`hexgate apikey new` prints it)"),
    key("expires", Kind::String, NONE, "RFC 3339 time (`2027-06-30T00:00:00Z`) or date (`2027-06-30`, midnight UTC) after which the key is refused"),
    key("scopes", Kind::List(Item::Any), Value("[]"), "scopes the key grants (see `requireScopes`)"),
];

/// The declaration of `name` among `decls`.
pub fn find(decls: &'static [KeyDecl], name: &str) -> Option<&'static KeyDecl> {
    decls.iter().find(|d| d.name == name)
}

/// The words a key of this kind may take (an enum, or the items of a list of words); empty for
/// other kinds.
pub fn words(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::Enum(w) | Kind::List(Item::OneOf(w)) | Kind::List(Item::OneOfAnyCase(w)) => w,
        _ => &[],
    }
}

/// The names of `decls`, in declaration order.
pub fn names(decls: &[KeyDecl]) -> Vec<&'static str> {
    decls.iter().map(|d| d.name).collect()
}

/// Every key as a dotted path (`services[].timeouts.connect`) with its declaration, depth first.
pub fn all() -> Vec<(String, &'static KeyDecl)> {
    fn walk(prefix: &str, decls: &'static [KeyDecl], out: &mut Vec<(String, &'static KeyDecl)>) {
        for d in decls {
            let path = join(prefix, d.name);
            out.push((path.clone(), d));
            match d.kind {
                Kind::Block(children) | Kind::Switch(children) => walk(&path, children, out),
                Kind::Blocks(children) => walk(&format!("{path}[]"), children, out),
                Kind::Named(children) => walk(&format!("{path}.NAME"), children, out),
                _ => {}
            }
        }
    }
    let mut out = Vec::new();
    walk("", TOP, &mut out);
    out
}

impl Kind {
    /// The kind in a few words, for the reference tables.
    pub fn describe(&self) -> String {
        let words = |w: &[&str]| {
            w.iter()
                .map(|w| format!("`{w}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self {
            Kind::String => "string".into(),
            Kind::Int { min, max } => format!("integer, {min} to {max}"),
            Kind::Port => "port".into(),
            Kind::Number { min_exclusive } => format!("number above {min_exclusive}"),
            Kind::Fraction => "number, 0 to 1".into(),
            Kind::Bool => "bool".into(),
            Kind::Duration => "duration".into(),
            Kind::Size => "size".into(),
            Kind::Ip => "IP address".into(),
            Kind::Enum(w) => format!("one of {}", words(w)),
            Kind::List(Item::Any) => "list".into(),
            Kind::List(Item::OneOf(w)) => format!("list of {}", words(w)),
            Kind::List(Item::OneOfAnyCase(w)) => format!("list of {} (any case)", words(w)),
            Kind::Map => "mapping".into(),
            Kind::Block(_) => "mapping".into(),
            Kind::Switch(_) => "bool or mapping".into(),
            Kind::Blocks(_) => "list of mappings".into(),
            Kind::Named(_) => "mapping of names to mappings".into(),
        }
    }
}

/// A key's dotted path: `path.key`, or `key` at the top.
pub fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}
