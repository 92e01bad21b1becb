//! Reading the top level of a config, and the checks across keys.

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::Duration;

use crate::keys;
use crate::read::{suggest, Fields, Reader, Switched};
use crate::service::{
    read_escaped_slashes, read_lb, read_rate_limit, read_service, read_timeouts, read_upgrades,
};
use crate::yaml::{self, Node};
use crate::{
    parse_cidr, AccessLog, AccessLogFormat, Authentication, Config, Consul, FailureMode, LimitKey,
    LoadBalancing, OtlpProtocol, RateLimitHeaders, Redis, Timeouts, Tls, Tracing,
    UnderscoreHeaders, ADMIN_TOKEN_ENV,
};

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
    let f = r.fields(node, "authentication", keys::AUTHENTICATION);
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
        let allowed = keys::words(f.kind("algorithms"));
        a.algorithms.clear();
        for (alg, line) in algs {
            if allowed.contains(&alg.as_str()) {
                a.algorithms.push(alg);
            } else {
                r.err(
                    line,
                    "authentication.algorithms",
                    format!(
                        "algorithm {alg:?} is not allowed (asymmetric only: {})",
                        allowed.join(", ")
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
    a.plan_claim = r.string(&f, "planClaim").filter(|s| !s.is_empty());
    a.default_plan = r.string(&f, "defaultPlan").filter(|s| !s.is_empty());
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

/// The line of `authentication.KEY` (else of the `authentication` block).
fn line_of_auth_key(f: &Fields, key: &str) -> usize {
    match f.get("authentication").map(|n| &n.kind) {
        Some(yaml::Kind::Map(entries)) => entries
            .iter()
            .find(|(k, _, _)| k == key)
            .map(|(_, l, _)| *l)
            .unwrap_or(f.key_line("authentication")),
        _ => f.key_line("authentication"),
    }
}

/// Headers that cannot carry API keys: the gateway reads, sets, logs or echoes them, or they
/// frame the message.
fn reserved_for_keys(name: &str) -> bool {
    matches!(
        name,
        "authorization"
            | "proxy-authorization"
            | "host"
            | "cookie"
            | "content-type"
            | "content-length"
            | "transfer-encoding"
            | "connection"
            | "keep-alive"
            | "te"
            | "trailer"
            | "upgrade"
            | "forwarded"
            | "x-request-id"
            | "x-consumer-id"
            | "x-real-ip"
    ) || name.starts_with("x-forwarded-")
}

fn read_redis(r: &mut Reader, node: &Node) -> Redis {
    let f = r.fields(node, "redis", keys::REDIS);
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
    let mut cluster = Vec::new();
    for (i, (node, line)) in r
        .string_list(&f, "cluster")
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        if !node.contains(':') || node.contains('@') || node.contains('/') {
            r.err(
                line,
                &format!("redis.cluster[{i}]"),
                format!(
                    "expected host:port (credentials go in username and password), found {:?}",
                    hexgate_http::httpc::redact_url(&node)
                ),
            );
        }
        cluster.push(node);
    }
    let tls = r.bool(&f, "tls").unwrap_or(false);
    if tls && !cluster.is_empty() {
        // The cluster client (redis-rs) is built without TLS; refused here rather than at
        // connect time, where a gateway would start and then fail every limit check.
        r.err(
            f.key_line("tls"),
            "redis.tls",
            "TLS to a Redis Cluster is not supported: use tls with a single address, or a cluster without tls",
        );
    }
    Redis {
        address,
        cluster,
        username: r.string(&f, "username").filter(|s| !s.is_empty()),
        password: r.string(&f, "password").unwrap_or_default(),
        db: r.uint(&f, "db").unwrap_or(0),
        tls,
        timeout: r
            .duration(&f, "timeout")
            .unwrap_or(Duration::from_millis(50)),
        failure_mode: match r.choice(&f, "failureMode").as_deref() {
            Some("closed") => FailureMode::Closed,
            _ => FailureMode::Open,
        },
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
    let f = r.fields(node, "consul", keys::CONSUL);
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

/// `accessLog`: `true`/`false` (text on stdout), or the mapping (json unless it says text).
fn read_access_log(r: &mut Reader, f: &Fields) -> AccessLog {
    match r.switch(f, "accessLog") {
        None => AccessLog::default(),
        Some(Switched::Bool(enabled)) => AccessLog {
            enabled,
            ..AccessLog::default()
        },
        Some(Switched::Block(af)) => AccessLog {
            enabled: r.bool(&af, "enabled").unwrap_or(true),
            format: match r.choice(&af, "format").as_deref() {
                Some("text") => AccessLogFormat::Text,
                _ => AccessLogFormat::Json,
            },
            path: r.string(&af, "path").filter(|p| !p.is_empty() && p != "-"),
        },
    }
}

/// `tracing`: the endpoint split into what the exporter dials, the headers checked.
fn read_tracing(r: &mut Reader, node: &Node) -> Option<Tracing> {
    let f = r.fields(node, "tracing", keys::TRACING);
    let enabled = r.bool(&f, "enabled").unwrap_or(true);
    let Some(endpoint) = r.string(&f, "otlpEndpoint") else {
        if !f.has("otlpEndpoint") {
            r.err(
                f.line,
                "tracing.otlpEndpoint",
                "is required: the collector's URL (http://127.0.0.1:4318, grpc://127.0.0.1:4317)",
            );
        }
        return None;
    };
    let line = f.key_line("otlpEndpoint");
    let bad = |r: &mut Reader, why: &str| {
        r.err(
            line,
            "tracing.otlpEndpoint",
            format!(
                "{why}, found {:?}",
                hexgate_http::httpc::redact_url(&endpoint)
            ),
        );
    };
    let uri = match endpoint.parse::<http::Uri>() {
        Ok(u) => u,
        Err(_) => {
            bad(
                r,
                "expected a URL such as http://127.0.0.1:4318 or grpc://127.0.0.1:4317",
            );
            return None;
        }
    };
    let scheme = uri.scheme_str().map(str::to_ascii_lowercase);
    let (protocol, tls, default_port) = match scheme.as_deref() {
        Some("http") => (OtlpProtocol::Http, false, 80),
        Some("https") => (OtlpProtocol::Http, true, 443),
        Some("grpc") => (OtlpProtocol::Grpc, false, 4317),
        Some("grpcs") => (OtlpProtocol::Grpc, true, 4317),
        _ => {
            bad(r, "expected an http://, https://, grpc:// or grpcs:// URL");
            return None;
        }
    };
    let Some(authority) = uri.authority() else {
        bad(r, "expected a host");
        return None;
    };
    if authority.as_str().contains('@') {
        bad(
            r,
            "credentials do not belong in the URL: put them in tracing.headers (shown redacted)",
        );
        return None;
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    if host.is_empty() {
        bad(r, "expected a host");
        return None;
    }
    if uri.query().is_some() || endpoint.contains('#') {
        bad(r, "a query or a fragment has no meaning here");
        return None;
    }
    // A port that is written must be one (`http::Uri` reads 79999 as no port at all, which
    // would send the exports, and their headers, to the default port).
    // Read from the text: `http::Uri` gives no port at all for `:79999` or `:`, which would send
    // the exports, and their headers, to the default port.
    let after_host = match authority.as_str().rfind(']') {
        Some(i) => &authority.as_str()[i + 1..],
        None => authority.as_str(),
    };
    let port = match after_host.rfind(':').map(|i| &after_host[i + 1..]) {
        None => default_port,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => {
                bad(r, &format!("port {p:?} is not a port (1 to 65535)"));
                return None;
            }
        },
    };
    let path = match protocol {
        OtlpProtocol::Http => {
            let p = uri.path().trim_end_matches('/');
            if p.ends_with("/v1/traces") {
                p.to_string()
            } else {
                format!("{p}/v1/traces")
            }
        }
        OtlpProtocol::Grpc => {
            if !matches!(uri.path(), "" | "/") {
                bad(r, "a gRPC endpoint has no path");
                return None;
            }
            crate::OTLP_GRPC_PATH.to_string()
        }
    };
    let mut headers = Vec::new();
    // Each entry's own line, by its name (entries that are not strings are left out of
    // `string_map`, so their order does not match).
    let lines: Vec<(&str, usize)> = match f.get("headers").map(|h| &h.kind) {
        Some(crate::yaml::Kind::Map(entries)) => {
            entries.iter().map(|(k, l, _)| (k.as_str(), *l)).collect()
        }
        _ => Vec::new(),
    };
    for (name, value) in r.string_map(&f, "headers").unwrap_or_default() {
        let lower = name.to_ascii_lowercase();
        let key = format!("tracing.headers.{name}");
        let line = lines
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, l)| *l)
            .unwrap_or_else(|| f.get("headers").map_or(f.line, |h| h.line));
        // What the exporter sets itself, and what would change the framing.
        const OWN: &[&str] = &[
            "host",
            "content-type",
            "content-length",
            "transfer-encoding",
            "connection",
            "te",
            "keep-alive",
            "upgrade",
            "proxy-connection",
            "trailer",
            "expect",
        ];
        if http::HeaderName::from_bytes(lower.as_bytes()).is_err() {
            r.err(line, &key, "is not a valid header name");
        } else if OWN.contains(&lower.as_str()) || lower.starts_with("grpc-") {
            r.err(line, &key, "is set by the exporter itself");
        } else if !value
            .bytes()
            .all(|b| b == b'\t' || (0x20..=0x7e).contains(&b))
        {
            // The value is a secret: say what is wrong, never what it is.
            r.err(
                line,
                &key,
                "the value holds a control character or a byte above 0x7E",
            );
        } else if headers.iter().any(|(n, _): &(String, String)| *n == lower) {
            r.err(line, &key, "is given twice (names are case-insensitive)");
        } else {
            headers.push((lower, value));
        }
    }
    let service_name = r
        .string(&f, "serviceName")
        .unwrap_or_else(|| "hexgate".into());
    if service_name.is_empty() {
        r.err(
            f.key_line("serviceName"),
            "tracing.serviceName",
            "must not be empty",
        );
    }
    let t = Tracing {
        otlp_endpoint: endpoint.clone(),
        protocol,
        tls,
        host: host.to_string(),
        port,
        path,
        service_name,
        sample_ratio: r.float(&f, "sampleRatio").unwrap_or(1.0),
        headers,
    };
    enabled.then_some(t)
}

pub(crate) fn read_config(r: &mut Reader, root: &Node) -> Config {
    let f = r.fields(root, "", keys::TOP);
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
        rate_limit_headers: match r.choice(&f, "rateLimitHeaders").as_deref() {
            Some("legacy") => RateLimitHeaders::Legacy,
            Some("both") => RateLimitHeaders::Both,
            Some("none") => RateLimitHeaders::None,
            _ => RateLimitHeaders::Draft,
        },
        authentication: Authentication::default(),
        api_keys: None,
        plans: Default::default(),
        policies: Default::default(),
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
        retries: r.uint(&f, "retries").map(|v| v as u32).unwrap_or(2),
        max_header_size: r.size(&f, "maxHeaderSize").unwrap_or(64 * 1024),
        max_body_size: r.size(&f, "maxBodySize"),
        max_connections: r.uint(&f, "maxConnections").unwrap_or(20_000),
        access_log: read_access_log(r, &f),
        tracing: f.get("tracing").and_then(|n| read_tracing(r, n)),
        shutdown_timeout: r
            .duration(&f, "shutdownTimeout")
            .unwrap_or(Duration::from_secs(30)),
        trusted_proxies: Vec::new(),
        max_header_count: r.uint(&f, "maxHeaderCount").unwrap_or(100),
        underscore_headers: match r.choice(&f, "underscoreHeaders").as_deref() {
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
    cfg.timeouts = read_timeouts(
        r,
        f.get("timeouts"),
        "timeouts",
        keys::TIMEOUTS,
        &cfg.timeouts,
    );
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
    cfg.policies = crate::policy::read_policies(r, &f, &crate::Policies::default());
    cfg.rate_limiting = f
        .get("rateLimiting")
        .map(|n| read_rate_limit(r, n, "rateLimiting"));
    cfg.authentication = read_auth(r, f.get("authentication"));
    if let Some(n) = f.get("plans") {
        cfg.plans = crate::service::read_plans(r, n);
        // One quota period for every plan: a consumer's plan counter is one per period, so
        // plans with different periods would give a consumer one quota per period (a key on
        // one plan, a token on another).
        let mut periods: Vec<(Duration, &String)> = cfg
            .plans
            .iter()
            .filter_map(|(name, p)| p.quota.as_ref().map(|q| (q.period, name)))
            .collect();
        periods.sort();
        if let (Some(first), Some(last)) = (periods.first(), periods.last()) {
            if first.0 != last.0 {
                r.err(
                    f.key_line("plans"),
                    "plans",
                    format!(
                        "every plan's quota needs the same period (plans.{}.quota.period is {}s, plans.{}.quota.period {}s): a consumer's plan quota is one counter over one window, whichever plan it is on",
                        first.1,
                        first.0.as_secs(),
                        last.1,
                        last.0.as_secs()
                    ),
                );
            }
        }
    }
    if let Some(p) = &cfg.authentication.default_plan {
        if !cfg.plans.contains_key(p) {
            let names: Vec<&str> = cfg.plans.keys().map(String::as_str).collect();
            let hint = match suggest(p, &names) {
                Some(s) => format!(" (did you mean \"{s}\"?)"),
                None if names.is_empty() => " (no plans are configured)".to_string(),
                None => format!(" (plans: {})", names.join(", ")),
            };
            r.err(
                line_of_auth_key(&f, "defaultPlan"),
                "authentication.defaultPlan",
                format!("{p:?} is not a plan{hint}"),
            );
        }
    }
    if cfg.authentication.plan_claim.is_some() && cfg.plans.is_empty() {
        r.err(
            line_of_auth_key(&f, "planClaim"),
            "authentication.planClaim",
            "names the plan claim, but no plans are configured (add a top-level plans block)",
        );
    }
    if let Some(n) = f.get("apiKeys") {
        let af = r.fields(n, "apiKeys", keys::API_KEYS);
        let header = r
            .string(&af, "header")
            .unwrap_or_else(|| "X-Api-Key".into());
        match http::HeaderName::from_bytes(header.as_bytes()) {
            Ok(h) if !reserved_for_keys(h.as_str()) => {
                let file = r.string(&af, "file").filter(|s| !s.is_empty());
                let consul_key = r.string(&af, "consulKey").filter(|s| !s.is_empty());
                match (&file, &consul_key) {
                    (Some(_), Some(_)) => r.err(
                        af.key_line("consulKey"),
                        "apiKeys.consulKey",
                        "set apiKeys.file or apiKeys.consulKey, not both",
                    ),
                    (None, None) => r.err(
                        af.line,
                        "apiKeys",
                        "needs file (a YAML list of keys) or consulKey (a Consul KV key holding one)",
                    ),
                    _ => {}
                }
                if let Some(k) = &consul_key {
                    if k.starts_with('/') || k.split('/').any(|seg| seg.is_empty() || seg == "." || seg == "..") {
                        r.err(
                            af.key_line("consulKey"),
                            "apiKeys.consulKey",
                            format!("{k:?} is not a Consul KV key (segments separated by /, no leading /, no empty, . or .. segment)"),
                        );
                    }
                }
                cfg.api_keys = Some(crate::ApiKeys {
                    header: h.as_str().to_string(),
                    file: file.unwrap_or_default(),
                    consul_key,
                });
            }
            _ => r.err(
                af.key_line("header"),
                "apiKeys.header",
                format!("{header:?} cannot carry API keys: use a header the gateway does not read, set or log (such as X-Api-Key)"),
            ),
        }
    }
    if let Some(n) = f.get("tls") {
        let tf = r.fields(n, "tls", keys::TLS);
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
            if svc.name == "plan" && !cfg.plans.is_empty() {
                r.err(
                    svc.line,
                    &format!("{path}.name"),
                    "\"plan\" names the plans' counters in the quota ledger: choose another service name",
                );
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
            if auth_on
                && svc.auth_methods.contains(&crate::AuthMethod::ApiKey)
                && cfg.api_keys.is_none()
            {
                r.err(
                    svc.line,
                    &format!("{path}.authentication.methods"),
                    "apiKey needs the top-level apiKeys block (file or consulKey)",
                );
            }
            let a = &cfg.authentication;
            if svc.authentication == Some(true)
                && !a.enabled
                && svc.auth_methods.contains(&crate::AuthMethod::Jwt)
                && a.public_key_path.is_none()
                && a.public_keys.is_empty()
                && a.jwks_url.is_none()
            {
                r.err(
                    svc.line,
                    &format!("{path}.authentication"),
                    "this route takes JWTs, and no key checks them: set authentication.publicKeyPath, publicKeys or jwksUrl (or methods: [apiKey])",
                );
            }
            if !auth_on && !svc.require_scopes.is_empty() {
                r.err(
                    svc.line,
                    &format!("{path}.requireScopes"),
                    "scopes come from a credential: turn authentication on for this route",
                );
            }
            if let Some(q) = &svc.quota {
                if q.enabled && q.key == LimitKey::Consumer && !auth_on {
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
                if rl.enabled && rl.key == LimitKey::Consumer && !auth_on {
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
            for (claim, header) in &cfg.authentication.forward_claims {
                let h = header.to_ascii_lowercase();
                let rules = &svc.policies.request_headers;
                if rules.set.iter().chain(&rules.add).any(|(n, _)| *n == h)
                    || rules.remove.contains(&h)
                {
                    r.err(
                        svc.line,
                        &format!("{path}.requestHeaders"),
                        format!("{header:?} carries the token's {claim:?} claim (authentication.forwardClaims): no rule may change it"),
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

/// Lines of the keys, from the YAML tree, for the checks that come after reading (the compile
/// step: files a key names, listeners that clash): top-level keys, the keys of each block, and
/// the items of their lists. Defaults have no line: their problems are reported at the line of
/// the enclosing block, or line 1.
fn file_key_lines(root: &Node) -> std::collections::BTreeMap<String, usize> {
    /// Records `path` (a key, `a.b`, or a list item, `a[0]`) and everything under it.
    fn walk(
        out: &mut std::collections::BTreeMap<String, usize>,
        path: &str,
        v: &Node,
        depth: usize,
    ) {
        if depth > 16 {
            return;
        }
        match &v.kind {
            yaml::Kind::Map(m) => {
                for (k, line, child) in m {
                    let at = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    out.insert(at.clone(), *line);
                    walk(out, &at, child, depth + 1);
                }
            }
            yaml::Kind::Seq(list) => {
                for (i, item) in list.iter().enumerate() {
                    let at = format!("{path}[{i}]");
                    out.insert(at.clone(), item.line);
                    walk(out, &at, item, depth + 1);
                }
            }
            _ => {}
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk(&mut out, "", root, 0);
    out
}

fn svc_has_key(n: &Node, key: &str) -> bool {
    matches!(&n.kind, yaml::Kind::Map(m) if m.iter().any(|(k, _, v)| k == key && !v.is_null()))
}
