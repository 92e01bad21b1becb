//! The immutable runtime view built from a validated `Config`: routes, pools, metric handles.
//! Requests load one snapshot and use it to the end; a reload builds a new one and swaps it in.

use std::net::IpAddr;
use std::sync::Arc;

use http::HeaderName;

use crate::auth::{Authenticator, X_CONSUMER_ID};
use crate::config::{parse_cidr, Config, ConfigError, ConfigErrors, PathType, Timeouts};
use crate::metrics::{Registry, ServiceMetrics, UNMATCHED};
use crate::proxy::route::{Route, Router};
use crate::upstream::{BackendSet, Pool};

/// One service as the request path sees it.
pub struct ServiceRt {
    pub name: String,
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
}

pub struct Snapshot {
    pub generation: u64,
    pub config: Arc<Config>,
    pub services: Vec<Arc<ServiceRt>>,
    pub router: Router,
    pub unmatched: Arc<ServiceMetrics>,
    pub trusted_proxies: Vec<(IpAddr, u8)>,
    pub auth: Option<Arc<Authenticator>>,
    /// Headers only the gateway sets upstream; removed from every client request.
    pub identity_headers: Vec<HeaderName>,
    /// Bearer token the admin listener requires (all paths but /healthz and /readyz).
    pub admin_token: Option<Arc<str>>,
}

impl Snapshot {
    /// Builds a snapshot. `prev_auth` is reused when the authentication config and key files are
    /// unchanged, so the JWKS cache and verified-token cache survive a reload.
    pub fn build(
        config: Config,
        generation: u64,
        metrics: &Arc<Registry>,
        backends: &BackendSet,
        prev_auth: Option<&Arc<Authenticator>>,
    ) -> Result<Snapshot, ConfigErrors> {
        // The compile step's file checks, as `validate` runs them (TLS aside: a snapshot never
        // changes the listeners); problems with file:line:key.
        crate::compile::check_files_for_reload(&config)?;
        let auth_needed = config.authentication.enabled
            || config
                .services
                .iter()
                .any(|s| s.authentication == Some(true));
        let auth = if auth_needed {
            let (fingerprint, keys) =
                Authenticator::prepare(&config.authentication, config.base_dir.as_deref())
                    .map_err(|e| auth_error(&config, e.to_string()))?;
            match prev_auth {
                Some(a) if a.fingerprint == fingerprint => Some(a.clone()),
                _ => Some(
                    Authenticator::new(&config.authentication, fingerprint, keys, metrics.clone())
                        .map_err(|e| auth_error(&config, e.to_string()))?,
                ),
            }
        } else {
            None
        };
        let identity_headers = match &auth {
            Some(a) => a.identity_headers(),
            None => vec![X_CONSUMER_ID],
        };
        let mut services = Vec::with_capacity(config.services.len());
        let mut routes = Vec::with_capacity(config.services.len());
        for s in &config.services {
            let pool = Arc::new(Pool::new(
                s.backends
                    .iter()
                    .map(|a| backends.get_or_create(a))
                    .collect(),
                s.load_balancing,
            ));
            let rt = Arc::new(ServiceRt {
                name: s.name.clone(),
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
        let admin_token = config.admin_token_value().map_err(|message| {
            ConfigErrors(vec![ConfigError {
                file: config.file.clone(),
                line: 0,
                key: "adminTokenFile".into(),
                message,
            }])
        })?;
        Ok(Snapshot {
            admin_token: admin_token.map(Arc::from),
            generation,
            auth,
            identity_headers,
            trusted_proxies: config
                .trusted_proxies
                .iter()
                .filter_map(|p| parse_cidr(p))
                .collect(),
            config: Arc::new(config),
            services,
            router: Router::new(routes),
            unmatched: metrics.service(UNMATCHED),
        })
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
            for b in &s.pool.members().backends {
                out.push((s.name.clone(), b.addr.to_string(), b.is_healthy()));
            }
        }
        out
    }
}

fn auth_error(config: &Config, message: String) -> ConfigErrors {
    ConfigErrors(vec![ConfigError {
        file: config.file.clone(),
        line: 0,
        key: "authentication".into(),
        message,
    }])
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
    fn cidrs() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(cidr_contains(ip("10.0.0.0"), 8, ip("10.1.2.3")));
        assert!(!cidr_contains(ip("10.0.0.0"), 8, ip("11.1.2.3")));
        assert!(cidr_contains(ip("127.0.0.1"), 32, ip("::ffff:127.0.0.1")));
        assert!(cidr_contains(ip("::1"), 128, ip("::1")));
    }
}
