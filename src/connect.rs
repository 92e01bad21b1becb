//! `hexgate validate --connect`: after the compile step, what a config needs the network for
//! (the JWKS URL, each Redis node, Consul, the API key list in Consul KV, the OTLP collector),
//! tried once each within a few seconds.

use std::time::Duration;

use crate::config::{Config, Redis};
use crate::discovery::consul::{ConsulClient, ConsulError};

const WAIT: Duration = Duration::from_secs(3);

/// One check: what was tried, and its outcome (a detail, or why it failed).
pub type Check = (String, Result<String, String>);

async fn within<T>(f: impl std::future::Future<Output = Result<T, String>>) -> Result<T, String> {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {}s", WAIT.as_secs())))
}

/// A Consul client whose address appears only redacted.
fn consul_client(cfg: &crate::config::Consul) -> Result<ConsulClient, String> {
    let mut c = ConsulClient::new(cfg).map_err(|e| match e {
        ConsulError::Http(addr, _) => format!("bad address {}", crate::httpc::redact_url(&addr)),
        other => other.to_string(),
    })?;
    c.addr = crate::httpc::redact_url(&c.addr);
    Ok(c)
}

/// Every check `cfg` calls for, in order: JWKS, Redis nodes, Consul, the OTLP collector.
pub async fn checks(cfg: &Config) -> Vec<Check> {
    let mut checks: Vec<Check> = Vec::new();
    if let Some(url) = &cfg.authentication.jwks_url {
        let fetch = async {
            let (body, _) = crate::httpc::get_url(url, WAIT)
                .await
                .map_err(|e| e.to_string())?;
            let keys = crate::auth::keys::from_jwks(&body, url).map_err(|e| e.to_string())?;
            Ok(format!("a JWK set with {} usable key(s)", keys.len()))
        };
        let name = format!("JWKS {}", crate::httpc::redact_url(url));
        checks.push((name, within(fetch).await));
    }
    if let Some(r) = &cfg.redis {
        let nodes: Vec<&String> = match &r.address {
            _ if !r.cluster.is_empty() => r.cluster.iter().collect(),
            Some(a) => vec![a],
            None => Vec::new(),
        };
        for node in nodes {
            checks.push((
                format!("Redis {}", crate::httpc::redact_url(node)),
                within(redis_ping(node, r)).await,
            ));
        }
    }
    let keys_key = cfg.api_keys.as_ref().and_then(|k| k.consul_key.as_deref());
    let consul = cfg.consul.address.is_some()
        || cfg.consul.register
        || cfg.services.iter().any(|s| s.consul_service_name.is_some())
        || keys_key.is_some();
    if consul {
        match consul_client(&cfg.consul) {
            Ok(c) => {
                let leader = async {
                    let leader = c.leader(WAIT).await.map_err(|e| match e {
                        ConsulError::Http(_, e) => e.to_string(),
                        other => other.to_string(),
                    })?;
                    match leader {
                        l if l.is_empty() => Err("answers, but has no leader".to_string()),
                        l => Ok(format!("leader {l}")),
                    }
                };
                checks.push((format!("Consul {}", c.addr), within(leader).await));
                if let Some(key) = keys_key {
                    checks.push((
                        format!("Consul key {key} (apiKeys.consulKey)"),
                        within(api_keys_value(&c, key)).await,
                    ));
                }
            }
            Err(e) => checks.push(("Consul".into(), Err(e.to_string()))),
        }
    }
    if let Some(t) = &cfg.tracing {
        checks.push((
            format!(
                "OTLP collector {}",
                crate::httpc::redact_url(&t.otlp_endpoint)
            ),
            within(crate::otel::export::probe(t)).await,
        ));
    }
    checks
}

/// Fetches the API key list at `key` and parses it as `run` would: a missing key fails here
/// (`run` would start with no keys), and so does a value that does not parse (each problem at
/// its line, never a key: the list holds only digests).
async fn api_keys_value(c: &ConsulClient, key: &str) -> Result<String, String> {
    let (value, _) = c
        .kv_get(key, 0, Duration::ZERO)
        .await
        .map_err(|e| match e {
            ConsulError::Http(_, e) => e.to_string(),
            other => other.to_string(),
        })?;
    let Some((text, _)) = value else {
        return Err(
            "the key does not exist (the gateway would start with no API keys, every key refused)"
                .into(),
        );
    };
    match crate::config::apikeys::parse_api_keys(&text, &crate::discovery::kv::source_name(key)) {
        Ok(entries) => Ok(format!("{} API key(s)", entries.len())),
        Err(errors) => Err(errors
            .0
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("; ")),
    }
}

/// Connects to one Redis node as the limiter does (its pipelined client: TLS with the system
/// roots when `redis.tls`, AUTH, SELECT) and sends PING.
async fn redis_ping(addr: &str, r: &Redis) -> Result<String, String> {
    use crate::limits::pipelined::{self, Client, Target, Value};
    let tls = if r.tls {
        Some(crate::httpc::tls_with_roots(None).map_err(|e| e.to_string())?)
    } else {
        None
    };
    let target = Target {
        addr,
        tls,
        username: r.username.as_deref(),
        password: &r.password,
        // A cluster has only database 0.
        db: if r.cluster.is_empty() { r.db } else { 0 },
    };
    let client = Client::connect(&target, WAIT)
        .await
        .map_err(|e| e.to_string())?;
    let mut ping = Vec::new();
    pipelined::encode(&mut ping, &[b"PING"]);
    match client
        .call(ping, 1)
        .await
        .map_err(|e| e.to_string())?
        .first()
    {
        Some(Value::Ok(s)) if s == "PONG" => Ok("PONG".into()),
        Some(Value::Error(e)) => Err(format!("Redis refused: {e}")),
        other => Err(format!("unexpected answer {other:?} to PING")),
    }
}
