//! The immutable runtime view built from a compiled config (`compile`): routes, pools, metric
//! handles, the settings requests read. It keeps no raw config. Requests load one snapshot and
//! use it to the end; a reload builds a new one and swaps it in.

use std::net::IpAddr;
use std::sync::Arc;

use http::HeaderName;

use crate::auth::{Authenticator, X_CONSUMER_ID};
use crate::compile::Compiled;
use crate::config::{parse_cidr, Config, PathType, Timeouts};
use crate::metrics::{Registry, ServiceMetrics, UNMATCHED};
use crate::router::{Route, Router};
use crate::rules::headers::HeaderPolicy;
use crate::upstream::{BackendSet, Pool, Profile};

/// One service as the request path sees it.
pub struct ServiceRt {
    pub name: String,
    /// The route's `path` as configured (spans' `http.route`).
    pub route: Arc<str>,
    pub pool: Arc<Pool>,
    /// The Consul watch feeding this pool, if any.
    pub discovery: Option<crate::discovery::WatchKey>,
    pub timeouts: Timeouts,
    pub retries: u32,
    /// Set when `stripPath` is on: the prefix removed before forwarding.
    pub strip_prefix: Option<String>,
    pub health_check_path: String,
    pub max_body_size: Option<u64>,
    pub metrics: Arc<ServiceMetrics>,
    /// JWT required on this route (global switch or the service's override).
    pub auth: bool,
    /// Rate limit and quota of this route, if any.
    pub limits: Option<crate::limits::RoutePolicies>,
    /// What this route does with `%2F`, `%5C` and `\\` in paths.
    pub escaped_slashes: crate::config::EscapedSlashes,
    /// `Upgrade` protocol tokens tunnelled on this route (lower-case).
    pub allowed_upgrades: Vec<String>,
    /// Credentials this route accepts (when `auth`): a JWT, an API key.
    pub accepts_jwt: bool,
    pub accepts_api_key: bool,
    /// `requireScopes`.
    pub require_scopes: Vec<String>,
    /// The consumer's plan limits apply here (authenticated, `plans` configured, not opted out).
    pub plans: bool,
    /// `cors`.
    pub cors: Option<crate::proxy::cors::CorsRt>,
    /// `requestHeaders`, `responseHeaders`.
    pub request_rules: crate::proxy::header_rules::RulesRt,
    pub response_rules: crate::proxy::header_rules::RulesRt,
    /// `rewrite`.
    pub rewrite: Option<crate::proxy::rewrite::RewriteRt>,
    /// `ipAllow`, `ipDeny` (None: every address).
    pub ip_rules: Option<crate::proxy::admission::IpRules>,
    /// `maxInFlight`.
    pub in_flight: Option<crate::proxy::admission::InFlight>,
    /// `split`: the route's weighted pools (empty: `pool` serves every request).
    pub splits: Vec<crate::proxy::split::SplitRt>,
    /// `retryOn`, `retryBudget`, `circuitBreaker`.
    pub retry: crate::proxy::retry::RetryRt,
}

impl ServiceRt {
    /// Every pool of the route: its own, then its splits'.
    pub fn pools(&self) -> impl Iterator<Item = &Arc<Pool>> {
        std::iter::once(&self.pool).chain(self.splits.iter().map(|s| &s.pool))
    }
}

/// `apiKeys`: the header keys come in, where the keys come from (the file or the Consul KV key),
/// and the key set (kept across reloads that keep the same source, and refreshed by
/// `reload::watch_api_keys` between reloads).
pub struct ApiKeysRt {
    pub header: HeaderName,
    pub source: crate::compile::ApiKeySource,
    pub store: Arc<crate::auth::apikeys::ApiKeyStore>,
}

/// What a live reload cannot change (listeners are bound once, the limit store connected once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fixed {
    gateway: (std::net::IpAddr, u16),
    admin: (std::net::IpAddr, u16),
    redis: Option<crate::config::Redis>,
    tls: crate::config::Tls,
    /// What the public listeners serve connections with (the admin listener takes a reload's).
    public: (crate::listen::Http1Limits, u64),
}

impl Fixed {
    pub fn of(c: &Config) -> Fixed {
        Fixed {
            gateway: (c.gateway_bind, c.gateway_port),
            admin: (c.admin_bind, c.admin_port),
            redis: c.redis.clone(),
            tls: c.tls.clone(),
            public: (crate::listen::Http1Limits::of(c), c.max_connections),
        }
    }

    /// The first setting that differs, named as in config.yaml.
    pub fn restart_needed(&self, new: &Fixed) -> Option<&'static str> {
        if self.gateway != new.gateway {
            Some("gatewayPort/gatewayBind")
        } else if self.admin != new.admin {
            Some("adminPort/adminBind")
        } else if self.redis != new.redis {
            Some("redis")
        } else if self.tls != new.tls {
            Some("tls")
        } else if self.public != new.public {
            Some("maxHeaderSize/maxHeaderCount/timeouts.headerRead/timeouts.idle/maxConnections on the public listeners")
        } else {
            None
        }
    }
}

/// The settings requests and the control plane read from the snapshot.
pub struct Settings {
    /// `accessLog`, when on: its format, destination and dropped-line counter.
    pub access_log: Option<crate::access_log::Sink>,
    /// `tracing`, when on: sampling and where spans go.
    pub tracing: Option<Arc<crate::otel::Tracer>>,
    /// The header-field policy (`rules::headers`) every request goes through.
    pub header_policy: HeaderPolicy,
    /// The HTTP/1 limits of the admin listener's new connections.
    pub http1: crate::listen::Http1Limits,
    pub health_check_interval: std::time::Duration,
    pub health_check_timeout: std::time::Duration,
    /// The config as `/admin/config` shows it (addresses with credentials redacted).
    pub shown: serde_json::Value,
}

pub struct Snapshot {
    pub generation: u64,
    pub settings: Settings,
    pub services: Vec<Arc<ServiceRt>>,
    pub router: Router<ServiceRt>,
    pub unmatched: Arc<ServiceMetrics>,
    pub trusted_proxies: Vec<(IpAddr, u8)>,
    pub auth: Option<Arc<Authenticator>>,
    /// Headers only the gateway sets upstream; removed from every client request.
    pub identity_headers: Vec<HeaderName>,
    /// Bearer token the admin listener requires (all paths but /healthz and /readyz).
    pub admin_token: Option<Arc<str>>,
    pub api_keys: Option<ApiKeysRt>,
    /// `plans` with `planClaim` and `defaultPlan`, when plans are configured.
    pub plans: Option<crate::limits::Plans>,
}

impl Snapshot {
    /// Builds a snapshot from a compiled config (nothing left to refuse). `prev_auth` is reused
    /// when the authentication settings and key files are unchanged, so the JWKS cache and
    /// verified-token cache survive a reload.
    pub fn build(
        compiled: Compiled,
        generation: u64,
        metrics: &Arc<Registry>,
        backends: &BackendSet,
        prev_auth: Option<&Arc<Authenticator>>,
        prev_keys: Option<&ApiKeysRt>,
    ) -> Snapshot {
        let Compiled {
            config,
            auth: material,
            tls: _,
            admin_token,
            upstream_tls,
            api_keys,
            rewrites,
        } = compiled;
        let api_keys = config
            .api_keys
            .as_ref()
            .zip(api_keys)
            .and_then(|(cfg, (src, entries))| {
                let header = crate::auth::apikeys::header_name(&cfg.header)?;
                // The same source keeps its store (and what the watcher installed):
                // a file refreshed with what compile just read, a Consul key as the
                // watcher left it (compile does not read it). A new source starts
                // from what compile read (none for a Consul key, until the watcher's
                // first answer).
                let store = match prev_keys {
                    Some(p) if p.source == src => {
                        if let crate::compile::ApiKeySource::File(_) = src {
                            p.store.replace(&entries);
                        }
                        p.store.clone()
                    }
                    _ => Arc::new(crate::auth::apikeys::ApiKeyStore::new(&entries)),
                };
                Some(ApiKeysRt {
                    header,
                    source: src,
                    store,
                })
            });
        let auth = material.map(|m| match prev_auth {
            Some(a) if a.fingerprint == m.fingerprint => a.clone(),
            _ => Authenticator::new(
                &config.authentication,
                m.fingerprint,
                m.keys,
                metrics.clone(),
            ),
        });
        let identity_headers = match &auth {
            Some(a) => a.identity_headers(),
            None => vec![X_CONSUMER_ID],
        };
        let mut services = Vec::with_capacity(config.services.len());
        let mut routes = Vec::with_capacity(config.services.len());
        for (i, s) in config.services.iter().enumerate() {
            let profile = Profile {
                protocol: s.upstream_protocol,
                tls: upstream_tls.get(i).cloned().flatten(),
            };
            let pool = Arc::new(Pool::with_profile(
                s.backends
                    .iter()
                    .map(|a| backends.get_or_create(a, &profile))
                    .collect(),
                s.load_balancing,
                profile.clone(),
            ));
            let rt = Arc::new(ServiceRt {
                name: s.name.clone(),
                route: Arc::from(s.path.as_str()),
                pool,
                discovery: s
                    .consul_service_name
                    .as_ref()
                    .map(|name| crate::discovery::WatchKey {
                        service: name.clone(),
                        tags: s.consul_tags.clone(),
                        datacenter: s.consul_datacenter.clone(),
                    }),
                timeouts: s.timeouts.clone(),
                retries: s.retries,
                strip_prefix: (s.strip_path && s.path_type == PathType::Prefix)
                    .then(|| s.path.trim_end_matches('/').to_string()),
                health_check_path: s.health_check_path.clone(),
                max_body_size: s.max_body_size,
                metrics: metrics.service(&s.name),
                auth: s.authentication.unwrap_or(config.authentication.enabled),
                limits: crate::limits::RoutePolicies::build(
                    &config,
                    &s.name,
                    s.rate_limiting.as_ref(),
                    s.quota.as_ref(),
                ),
                escaped_slashes: s.escaped_slashes,
                allowed_upgrades: s.allowed_upgrades.clone(),
                accepts_jwt: s.auth_methods.contains(&crate::config::AuthMethod::Jwt),
                accepts_api_key: s.auth_methods.contains(&crate::config::AuthMethod::ApiKey),
                require_scopes: s.require_scopes.clone(),
                plans: s.plans
                    && !config.plans.is_empty()
                    && s.authentication.unwrap_or(config.authentication.enabled),
                cors: s
                    .policies
                    .cors
                    .as_ref()
                    .map(crate::proxy::cors::CorsRt::build),
                request_rules: crate::proxy::header_rules::RulesRt::build(
                    &s.policies.request_headers,
                ),
                response_rules: crate::proxy::header_rules::RulesRt::build(
                    &s.policies.response_headers,
                ),
                rewrite: rewrites.get(i).cloned().flatten(),
                ip_rules: crate::proxy::admission::IpRules::build(&s.policies),
                in_flight: s.policies.max_in_flight.map(|max| {
                    crate::proxy::admission::InFlight::build(
                        max,
                        &config.plans,
                        metrics.service(&s.name),
                    )
                }),
                splits: s
                    .split
                    .iter()
                    .map(|sp| crate::proxy::split::SplitRt {
                        name: sp.name.clone(),
                        weight: sp.weight,
                        matches: sp.matches.clone(),
                        pool: Arc::new(Pool::with_profile(
                            sp.backends
                                .iter()
                                .map(|a| backends.get_or_create(a, &profile))
                                .collect(),
                            s.load_balancing,
                            profile.clone(),
                        )),
                        metrics: metrics.service(&s.name).split(&sp.name),
                    })
                    .collect(),
                retry: crate::proxy::retry::RetryRt::build(&s.policies),
            });
            routes.push(Route {
                path: s.path.clone(),
                path_type: s.path_type,
                hosts: s.hosts.clone(),
                methods: s
                    .methods
                    .iter()
                    .filter_map(|m| http::Method::from_bytes(m.as_bytes()).ok())
                    .collect(),
                service: rt.clone(),
            });
            services.push(rt);
        }
        let settings = Settings {
            access_log: crate::access_log::Sink::of(&config, metrics),
            tracing: crate::otel::Tracer::of(config.tracing.as_ref()),
            header_policy: HeaderPolicy {
                max_count: usize::try_from(config.max_header_count).unwrap_or(usize::MAX),
                max_bytes: config.max_header_size,
                underscores: config.underscore_headers,
            },
            http1: crate::listen::Http1Limits::of(&config),
            health_check_interval: config.health_check_interval,
            health_check_timeout: config.health_check_timeout,
            shown: shown_config(&config),
        };
        Snapshot {
            plans: crate::limits::Plans::build(&config),
            admin_token,
            api_keys,
            settings,
            generation,
            auth,
            identity_headers,
            trusted_proxies: config
                .trusted_proxies
                .iter()
                .filter_map(|p| parse_cidr(p))
                .collect(),
            services,
            router: Router::new(routes),
            unmatched: metrics.service(UNMATCHED),
        }
    }

    /// Every pool of the snapshot (routes' and splits'): what passive ejection weighs a
    /// backend's failure against.
    pub fn pools(&self) -> impl Iterator<Item = &Pool> {
        self.services.iter().flat_map(|s| s.pools().map(|p| &**p))
    }

    /// The pools fed by Consul, with the watch each follows.
    pub fn discovered_pools(
        &self,
    ) -> impl Iterator<Item = (&crate::discovery::WatchKey, &Arc<Pool>)> {
        self.services
            .iter()
            .filter_map(|s| s.discovery.as_ref().map(|k| (k, &s.pool)))
    }

    pub fn is_trusted_proxy(&self, ip: IpAddr) -> bool {
        self.trusted_proxies
            .iter()
            .any(|(net, len)| cidr_contains(*net, *len, ip))
    }

    /// (service, backend, healthy) for every backend, for metrics and /admin/upstreams.
    pub fn health(&self) -> Vec<(String, String, bool)> {
        let mut out = Vec::new();
        for s in &self.services {
            let first = out.len();
            for pool in s.pools() {
                for b in &pool.members().backends {
                    let addr = b.addr.to_string();
                    // Two splits may share a backend: one series per service and address.
                    if !out[first..].iter().any(|(_, a, _)| *a == addr) {
                        out.push((s.name.clone(), addr, b.is_healthy()));
                    }
                }
            }
        }
        out
    }
}

/// The config as /admin/config shows it: secrets are redacted by the config's serializer;
/// addresses that may carry `user:pass@` or `?token=` (Consul, Redis, the JWKS URL) are shown
/// through `redact_url` here too.
fn shown_config(cfg: &Config) -> serde_json::Value {
    use crate::httpc::redact_url;
    use serde_json::Value;
    fn redact_at(v: &mut Value, path: &[&str]) {
        match v.pointer_mut(&format!("/{}", path.join("/"))) {
            Some(Value::String(s)) => *s = redact_url(s),
            Some(Value::Array(items)) => {
                for item in items {
                    if let Value::String(s) = item {
                        *s = redact_url(s);
                    }
                }
            }
            _ => {}
        }
    }
    let mut v = serde_json::to_value(cfg).unwrap_or(Value::Null);
    for path in [
        &["authentication", "jwksUrl"][..],
        &["consul", "address"],
        &["redis", "address"],
        &["redis", "cluster"],
    ] {
        redact_at(&mut v, path);
    }
    v
}

fn cidr_contains(net: IpAddr, len: u8, ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            u32::from(n) & mask == u32::from(i) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(i)) => {
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len)
            };
            u128::from(n) & mask == u128::from(i) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_needs_a_restart_is_compared_by_value() {
        let cfg = |extra: &str| {
            crate::config::parse(&format!("{extra}services: []\n"), "gw.yaml").expect("valid")
        };
        let base = Fixed::of(&cfg("redis:\n  address: 127.0.0.1:6379\n"));
        assert_eq!(
            base.restart_needed(&Fixed::of(&cfg("redis:\n  address: 127.0.0.1:6379\n"))),
            None
        );
        // A credential is part of the comparison, though it is never shown.
        let secret = cfg("redis:\n  address: 127.0.0.1:6379\n  password: other\n");
        assert_eq!(base.restart_needed(&Fixed::of(&secret)), Some("redis"));
        let moved = cfg("gatewayPort: 8001\nredis:\n  address: 127.0.0.1:6379\n");
        assert_eq!(
            base.restart_needed(&Fixed::of(&moved)),
            Some("gatewayPort/gatewayBind")
        );
        let bigger = cfg("maxHeaderSize: 16384\nredis:\n  address: 127.0.0.1:6379\n");
        assert!(base
            .restart_needed(&Fixed::of(&bigger))
            .is_some_and(|r| r.contains("maxHeaderSize")));
    }

    #[test]
    fn cidrs() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(cidr_contains(ip("10.0.0.0"), 8, ip("10.1.2.3")));
        assert!(!cidr_contains(ip("10.0.0.0"), 8, ip("11.1.2.3")));
        assert!(cidr_contains(ip("127.0.0.1"), 32, ip("::ffff:127.0.0.1")));
        assert!(cidr_contains(ip("::1"), 128, ip("::1")));
    }
}
