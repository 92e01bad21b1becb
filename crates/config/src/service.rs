//! Reading one `services[]` entry and the blocks it shares with the top level (timeouts, rate
//! limits, quotas, the edge policies).

use std::time::Duration;

use crate::keys;
use crate::read::{valid_name, Fields, Reader};
use crate::yaml::Node;
use crate::{
    AuthMethod, BackendAddr, Config, EscapedSlashes, LimitKey, LoadBalancing, PathType, Quota,
    RateLimit, Scheme, Service, Timeouts, UpstreamProtocol, UpstreamTls,
};

pub(crate) fn read_timeouts(
    r: &mut Reader,
    node: Option<&Node>,
    path: &str,
    decls: &'static [keys::KeyDecl],
    base: &Timeouts,
) -> Timeouts {
    let mut t = base.clone();
    if let Some(node) = node {
        let f = r.fields(node, path, decls);
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

pub(crate) fn read_rate_limit(r: &mut Reader, node: &Node, path: &str) -> RateLimit {
    let f = r.fields(node, path, keys::RATE_LIMIT);
    let enabled = r.bool(&f, "enabled").unwrap_or(false);
    let rate = r.float(&f, "ratePerSecond");
    let burst = r.uint(&f, "burst");
    if enabled && rate.is_none() && !f.has("ratePerSecond") {
        r.err(
            f.line,
            &f.key_path("ratePerSecond"),
            "required when enabled",
        );
    }
    let key = read_limit_key(r, &f, LimitKey::Ip);
    RateLimit {
        enabled,
        rate_per_second: rate.unwrap_or(1.0),
        burst: burst.unwrap_or(1),
        key,
    }
}

fn read_limit_key(r: &mut Reader, f: &Fields, default: LimitKey) -> LimitKey {
    let Some(k) = r.string(f, "key") else {
        return default;
    };
    match LimitKey::parse(&k) {
        Some(key) => key,
        None => {
            r.err(
                f.key_line("key"),
                &f.key_path("key"),
                format!("must be ip, consumer or header:NAME, found {k:?}"),
            );
            default
        }
    }
}

/// `plans`: a mapping of plan names to their limits (always per consumer, always on).
pub(crate) fn read_plans(
    r: &mut Reader,
    node: &Node,
) -> std::collections::BTreeMap<String, crate::Plan> {
    let mut plans = std::collections::BTreeMap::new();
    let crate::yaml::Kind::Map(entries) = &node.kind else {
        r.err(
            node.line,
            "plans",
            format!(
                "expected a mapping of plan names, found a {}",
                node.type_name()
            ),
        );
        return plans;
    };
    for (name, line, n) in entries {
        let path = format!("plans.{name}");
        if !valid_name(name) {
            r.err(
                *line,
                &path,
                "a plan name is letters, digits, '-', '_' or '.'",
            );
            continue;
        }
        if plans.contains_key(name) {
            r.err(*line, &path, "duplicate plan");
            continue;
        }
        if n.is_null() {
            r.err(*line, &path, "a plan needs rateLimiting or quota");
            continue;
        }
        let f = r.fields(n, &path, keys::PLAN);
        if !f.has("rateLimiting") && !f.has("quota") {
            r.err(
                *line,
                &path,
                "a plan needs rateLimiting or quota (a plan without limits would let its consumers through unlimited)",
            );
        }
        let rate_limiting = f.get("rateLimiting").map(|n| {
            let rf = r.fields(n, &f.key_path("rateLimiting"), keys::PLAN_RATE);
            let rate = r.float(&rf, "ratePerSecond");
            if !rf.has("ratePerSecond") {
                r.err(rf.line, &rf.key_path("ratePerSecond"), "required");
            }
            RateLimit {
                enabled: true,
                rate_per_second: rate.unwrap_or(1.0),
                burst: r.uint(&rf, "burst").unwrap_or(1),
                key: LimitKey::Consumer,
            }
        });
        let quota = f.get("quota").map(|n| {
            let qf = r.fields(n, &f.key_path("quota"), keys::PLAN_QUOTA);
            for k in ["limit", "period"] {
                if !qf.has(k) {
                    r.err(qf.line, &qf.key_path(k), "required");
                }
            }
            let period = r.duration(&qf, "period");
            if period.is_some_and(|p| p < Duration::from_secs(1) || p.subsec_nanos() != 0) {
                // Whole seconds: plans' quota counters are shared by period, in seconds.
                r.err(
                    qf.key_line("period"),
                    &qf.key_path("period"),
                    "must be a whole number of seconds, at least 1s",
                );
            }
            Quota {
                enabled: true,
                limit: r.uint(&qf, "limit").unwrap_or(1),
                period: period.unwrap_or(Duration::from_secs(60)),
                key: LimitKey::Consumer,
            }
        });
        plans.insert(
            name.clone(),
            crate::Plan {
                priority: r.uint(&f, "priority").unwrap_or(0) as u32,
                rate_limiting,
                quota,
            },
        );
    }
    plans
}

/// The scopes listed under `key` (a route's `requireScopes`, an API key's `scopes`): each one
/// visible ASCII without space, quote or backslash (RFC 6749), else refused at its line.
pub(crate) fn read_scopes(r: &mut Reader, f: &Fields, key: &str) -> Vec<String> {
    let mut scopes = Vec::new();
    for (scope, line) in r.string_list(f, key).unwrap_or_default() {
        if scope.is_empty()
            || !scope
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
        {
            r.err(
                line,
                &f.key_path(key),
                format!("{scope:?} is not a scope (RFC 6749: visible ASCII, no space, quote or backslash)"),
            );
        } else {
            scopes.push(scope);
        }
    }
    scopes
}

fn read_quota(r: &mut Reader, node: &Node, path: &str) -> Quota {
    let f = r.fields(node, path, keys::QUOTA);
    let enabled = r.bool(&f, "enabled").unwrap_or(false);
    let limit = r.uint(&f, "limit");
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
    let key = read_limit_key(r, &f, LimitKey::Consumer);
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
    let (scheme, rest) = match s.split_once("://") {
        Some((name, rest)) => match Scheme::parse(name).filter(|_| name != "grpc") {
            Some(scheme) => (scheme, rest),
            None => {
                let hint = if name == "grpc" {
                    "; use h2c:// for gRPC without TLS, https:// with it"
                } else {
                    ""
                };
                r.err(
                    line,
                    path,
                    format!(
                        "unsupported scheme {name:?} in {shown:?} (backends are http://, https:// or h2c://host:port{hint})"
                    ),
                );
                return None;
            }
        },
        None => (Scheme::Http, s),
    };
    let authority = rest.trim_end_matches('/');
    if authority.contains('/') || authority.contains('?') || authority.contains('@') {
        r.err(
            line,
            path,
            format!("backend {shown:?} must be scheme://host:port with no path"),
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
        scheme.default_port()
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
    Some(BackendAddr { scheme, host, port })
}

fn read_upstream_tls(r: &mut Reader, node: &Node, path: &str) -> UpstreamTls {
    let f = r.fields(node, path, keys::UPSTREAM_TLS);
    let t = UpstreamTls {
        ca_file: r.string(&f, "caFile").filter(|s| !s.is_empty()),
        server_name: r.string(&f, "serverName").filter(|s| !s.is_empty()),
        cert_file: r.string(&f, "certFile").filter(|s| !s.is_empty()),
        key_file: r.string(&f, "keyFile").filter(|s| !s.is_empty()),
        insecure_skip_verify: r.bool(&f, "insecureSkipVerify").unwrap_or(false),
    };
    match (&t.cert_file, &t.key_file) {
        (Some(_), None) => r.err(
            f.key_line("certFile"),
            &f.key_path("keyFile"),
            "required with certFile",
        ),
        (None, Some(_)) => r.err(
            f.key_line("keyFile"),
            &f.key_path("certFile"),
            "required with keyFile",
        ),
        _ => {}
    }
    if let Some(name) = &t.server_name {
        let ok = rustls_pki_types::ServerName::try_from(name.as_str()).is_ok();
        if !ok {
            r.err(
                f.key_line("serverName"),
                &f.key_path("serverName"),
                format!("{name:?} is not a DNS name or IP address"),
            );
        }
    }
    t
}

fn read_upstream_protocol(
    r: &mut Reader,
    f: &Fields,
    backends: &[BackendAddr],
) -> UpstreamProtocol {
    let p = match r.choice(f, "upstreamProtocol").as_deref() {
        Some("http1") => UpstreamProtocol::Http1,
        Some("http2") => UpstreamProtocol::Http2,
        _ => UpstreamProtocol::Auto,
    };
    if p == UpstreamProtocol::Http1 && backends.iter().any(|b| b.scheme == Scheme::H2c) {
        r.err(
            f.key_line("upstreamProtocol"),
            &f.key_path("upstreamProtocol"),
            "http1 contradicts an h2c:// backend (cleartext HTTP/2)",
        );
    }
    p
}

pub(crate) fn read_service(r: &mut Reader, node: &Node, path: &str, top: &Config) -> Service {
    let f = r.fields(node, path, keys::SERVICE);
    let name = r.string(&f, "name").unwrap_or_default();
    if name.is_empty() {
        r.err(f.line, &f.key_path("name"), "required");
    } else if !valid_name(&name) {
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
    let path_type = match r.choice(&f, "pathType").as_deref() {
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
    let upstream_tls = f
        .get("upstreamTls")
        .map(|n| read_upstream_tls(r, n, &f.key_path("upstreamTls")));
    let upstream_protocol = read_upstream_protocol(r, &f, &backends);
    let consul_service_name = r.string(&f, "consulServiceName").filter(|s| !s.is_empty());
    if upstream_tls.is_some()
        && consul_service_name.is_none()
        && !backends.is_empty()
        && !backends.iter().any(|b| b.scheme == Scheme::Https)
    {
        r.err(
            f.key_line("upstreamTls"),
            &f.key_path("upstreamTls"),
            "applies to https:// backends, and this service has none (its traffic would go in cleartext)",
        );
    }
    let split = crate::policy::read_split(r, &f, &mut |r, b, line, p| read_backend(r, b, line, p));
    if !split.is_empty() && (!backends.is_empty() || consul_service_name.is_some()) {
        r.err(
            f.key_line("split"),
            &f.key_path("split"),
            "instead of backends and consulServiceName, not with them",
        );
    }
    if backends.is_empty() && consul_service_name.is_none() && split.is_empty() {
        r.err(
            f.line,
            path,
            format!("service {name:?} needs backends, consulServiceName (or both), or split"),
        );
    }
    let rewrite = f
        .get("rewrite")
        .map(|n| crate::policy::read_rewrite(r, n, &f.key_path("rewrite")));
    if rewrite.is_some() && r.bool(&f, "stripPath") == Some(true) {
        r.err(
            f.key_line("rewrite"),
            &f.key_path("rewrite"),
            "not with stripPath: write the prefix's removal into the rewrite",
        );
    }
    let policies = crate::policy::read_policies(r, &f, &top.policies);
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
        if keys::words(f.kind("methods")).contains(&up.as_str()) {
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
    let timeouts = read_timeouts(
        r,
        f.get("timeouts"),
        &f.key_path("timeouts"),
        keys::SERVICE_TIMEOUTS,
        &top.timeouts,
    );
    let mut auth_methods = vec![AuthMethod::Jwt];
    let authentication = match f.get("authentication") {
        Some(n) => {
            let af = r.fields(
                n,
                &f.key_path("authentication"),
                keys::SERVICE_AUTHENTICATION,
            );
            if let Some(list) = r.string_list(&af, "methods") {
                let mut methods = Vec::new();
                for (m, line) in list {
                    let m = match m.as_str() {
                        "apiKey" => AuthMethod::ApiKey,
                        "jwt" => AuthMethod::Jwt,
                        other => {
                            r.err(
                                line,
                                &af.key_path("methods"),
                                format!("unknown method {other:?} (jwt or apiKey)"),
                            );
                            continue;
                        }
                    };
                    if !methods.contains(&m) {
                        methods.push(m);
                    }
                }
                if methods.is_empty() {
                    r.err(
                        af.key_line("methods"),
                        &af.key_path("methods"),
                        "at least one of jwt, apiKey",
                    );
                } else {
                    auth_methods = methods;
                }
            }
            let enabled = r.bool(&af, "enabled");
            if af.has("methods") && enabled != Some(true) && !top.authentication.enabled {
                r.err(
                    af.key_line("methods"),
                    &af.key_path("methods"),
                    "methods apply to a route with authentication on: add enabled: true",
                );
            }
            enabled
        }
        None => None,
    };
    let require_scopes = read_scopes(r, &f, "requireScopes");
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
        upstream_tls,
        upstream_protocol,
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
            .uint(&f, "retries")
            .map(|v| v as u32)
            .unwrap_or(top.retries),
        health_check_path: r
            .string(&f, "healthCheckPath")
            .unwrap_or_else(|| top.health_check_path.clone()),
        max_body_size: r.size(&f, "maxBodySize").or(top.max_body_size),
        authentication,
        auth_methods,
        require_scopes,
        plans: r.bool(&f, "plans").unwrap_or(true),
        policies,
        rewrite,
        split,
        rate_limiting,
        quota,
        name,
    }
}

pub(crate) fn read_escaped_slashes(r: &mut Reader, f: &Fields) -> Option<EscapedSlashes> {
    match r.choice(f, "escapedSlashes").as_deref() {
        Some("keep") => Some(EscapedSlashes::Keep),
        Some("decode") => Some(EscapedSlashes::Decode),
        Some(_) => Some(EscapedSlashes::Reject),
        None => None,
    }
}

/// `allowedUpgrades`: protocol tokens (RFC 9110 `token`, compared case-insensitively).
pub(crate) fn read_upgrades(r: &mut Reader, f: &Fields) -> Option<Vec<String>> {
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

pub(crate) fn read_lb(r: &mut Reader, f: &Fields) -> Option<LoadBalancing> {
    match r.choice(f, "loadBalancing").as_deref() {
        Some("leastRequest") => Some(LoadBalancing::LeastRequest),
        Some(_) => Some(LoadBalancing::RoundRobin),
        None => None,
    }
}
