//! A thin Consul HTTP API client: health (blocking queries), KV (blocking reads, check-and-set
//! writes), agent service registration. Honours the standard client environment
//! (CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN, CONSUL_HTTP_SSL, CONSUL_CACERT); a `consul:` config block
//! overrides it.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::Bytes;
use http::{Method, StatusCode};

use hexgate_config::{BackendAddr, Consul as ConsulConfig};
use hexgate_http::httpc::{Endpoint, HttpError};

#[derive(Debug, thiserror::Error)]
pub enum ConsulError {
    #[error("Consul at {0}: {1}")]
    Http(String, HttpError),
    #[error("Consul answered {0}: {1}")]
    Status(u16, String),
    #[error("unexpected answer from Consul: {0}")]
    Decode(String),
}

#[derive(Clone)]
pub struct ConsulClient {
    endpoint: Endpoint,
    token: Option<String>,
    pub datacenter: Option<String>,
    pub addr: String,
}

/// One healthy instance of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// The address, its scheme the declared one or else `http` (see [`Instance::declared`]).
    pub addr: BackendAddr,
    pub weight: u32,
    /// The scheme the instance declares (`Meta.protocol` or a tag), if any.
    pub declared: Option<hexgate_config::Scheme>,
}

use hexgate_http::httpc::percent_encode as enc;

/// A KV key path: segments are encoded, slashes kept.
fn enc_key(key: &str) -> String {
    key.split('/').map(enc).collect::<Vec<_>>().join("/")
}

fn ensure_ok(status: StatusCode, body: &[u8]) -> Result<(), ConsulError> {
    if status.is_success() {
        Ok(())
    } else {
        Err(ConsulError::Status(
            status.as_u16(),
            String::from_utf8_lossy(body).into_owned(),
        ))
    }
}

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.is_empty())
}

/// Where a client for `cfg` connects (`consul.address`, else CONSUL_HTTP_ADDR, else the local
/// agent) and whether it uses TLS without a scheme saying so (CONSUL_HTTP_SSL).
fn address(cfg: &ConsulConfig) -> (String, bool) {
    let addr = cfg
        .address
        .clone()
        .or_else(|| env("CONSUL_HTTP_ADDR"))
        .unwrap_or_else(|| "http://127.0.0.1:8500".into());
    let ssl = env("CONSUL_HTTP_SSL").is_some_and(|v| v == "true" || v == "1");
    (addr, ssl)
}

/// The CA file a client for `cfg` reads (`consul.caCert`, else CONSUL_CACERT), when it talks
/// HTTPS; the compile step checks it before anything starts.
pub fn ca_file(cfg: &ConsulConfig) -> Option<String> {
    let (addr, ssl) = address(cfg);
    let https = addr.starts_with("https://") || (!addr.contains("://") && ssl);
    https
        .then(|| cfg.ca_cert.clone().or_else(|| env("CONSUL_CACERT")))
        .flatten()
}

impl ConsulClient {
    pub fn new(cfg: &ConsulConfig) -> Result<ConsulClient, ConsulError> {
        let (addr, ssl) = address(cfg);
        let ca = cfg.ca_cert.clone().or_else(|| env("CONSUL_CACERT"));
        let endpoint = Endpoint::parse(&addr, ssl, ca.as_deref())
            .map_err(|e| ConsulError::Http(addr.clone(), e))?;
        Ok(ConsulClient {
            endpoint,
            token: cfg.token.clone().or_else(|| env("CONSUL_HTTP_TOKEN")),
            datacenter: cfg.datacenter.clone(),
            addr,
        })
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        timeout: Duration,
    ) -> Result<(StatusCode, http::HeaderMap, Bytes), ConsulError> {
        let mut headers = Vec::new();
        if let Some(t) = &self.token {
            headers.push(("x-consul-token", t.as_str()));
        }
        self.endpoint
            .send(method, path, &headers, body, timeout)
            .await
            .map_err(|e| ConsulError::Http(self.addr.clone(), e))
    }

    pub fn host(&self) -> &str {
        &self.endpoint.host
    }

    pub fn port(&self) -> u16 {
        self.endpoint.port
    }

    fn index_of(headers: &http::HeaderMap) -> u64 {
        headers
            .get("x-consul-index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// Healthy instances of `service` (blocking when `index` > 0) and the new index.
    pub async fn health_service(
        &self,
        service: &str,
        tags: &[String],
        dc: Option<&str>,
        index: u64,
        wait: Duration,
    ) -> Result<(Vec<Instance>, u64), ConsulError> {
        let mut path = format!("/v1/health/service/{}?passing=1", enc(service));
        for t in tags {
            path.push_str(&format!("&tag={}", enc(t)));
        }
        if let Some(dc) = dc.or(self.datacenter.as_deref()) {
            path.push_str(&format!("&dc={}", enc(dc)));
        }
        if index > 0 {
            path.push_str(&format!("&index={index}&wait={}s", wait.as_secs().max(1)));
        }
        let (status, headers, body) = self
            .call(Method::GET, &path, None, wait + Duration::from_secs(10))
            .await?;
        ensure_ok(status, &body)?;
        let v: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| ConsulError::Decode(e.to_string()))?;
        let entries = v
            .as_array()
            .ok_or_else(|| ConsulError::Decode("health answer is not a list".into()))?;
        let mut out = Vec::new();
        for e in entries {
            let svc = &e["Service"];
            let mut host = svc["Address"].as_str().unwrap_or("").to_string();
            if host.is_empty() {
                host = e["Node"]["Address"].as_str().unwrap_or("").to_string();
            }
            let Some(port) = svc["Port"].as_u64().filter(|p| *p > 0 && *p < 65536) else {
                continue;
            };
            if host.is_empty() {
                continue;
            }
            let weight = svc["Weights"]["Passing"]
                .as_u64()
                .unwrap_or(1)
                .clamp(1, 100) as u32;
            let declared = instance_scheme(svc);
            out.push(Instance {
                declared,
                addr: BackendAddr {
                    scheme: declared.unwrap_or_default(),
                    host,
                    port: port as u16,
                },
                weight,
            });
        }
        out.sort_by(|a, b| (&a.addr.host, a.addr.port).cmp(&(&b.addr.host, b.addr.port)));
        Ok((out, Self::index_of(&headers)))
    }

    /// A KV value and its ModifyIndex (None when missing), plus the X-Consul-Index to block on.
    pub async fn kv_get(
        &self,
        key: &str,
        index: u64,
        wait: Duration,
    ) -> Result<(Option<(String, u64)>, u64), ConsulError> {
        let mut path = format!("/v1/kv/{}", enc_key(key));
        if index > 0 {
            path.push_str(&format!("?index={index}&wait={}s", wait.as_secs().max(1)));
        }
        let (status, headers, body) = self
            .call(Method::GET, &path, None, wait + Duration::from_secs(10))
            .await?;
        let idx = Self::index_of(&headers);
        if status == StatusCode::NOT_FOUND {
            return Ok((None, idx));
        }
        ensure_ok(status, &body)?;
        let v: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| ConsulError::Decode(e.to_string()))?;
        let entry = &v[0];
        let modify = entry["ModifyIndex"].as_u64().unwrap_or(0);
        let value = match entry["Value"].as_str() {
            Some(b64) => {
                let raw = STANDARD
                    .decode(b64)
                    .map_err(|e| ConsulError::Decode(e.to_string()))?;
                String::from_utf8(raw)
                    .map_err(|_| ConsulError::Decode("value is not UTF-8".into()))?
            }
            None => String::new(),
        };
        Ok((Some((value, modify)), idx))
    }

    /// Writes a KV value. With `cas`, only if the key's ModifyIndex is still `cas` (0: only if the
    /// key does not exist). Returns whether the write happened.
    pub async fn kv_put(
        &self,
        key: &str,
        value: &str,
        cas: Option<u64>,
    ) -> Result<bool, ConsulError> {
        let mut path = format!("/v1/kv/{}", enc_key(key));
        if let Some(c) = cas {
            path.push_str(&format!("?cas={c}"));
        }
        let (status, _, body) = self
            .call(
                Method::PUT,
                &path,
                Some(Bytes::from(value.to_string())),
                Duration::from_secs(10),
            )
            .await?;
        ensure_ok(status, &body)?;
        Ok(String::from_utf8_lossy(&body).trim() == "true")
    }

    pub async fn register(&self, definition: &serde_json::Value) -> Result<(), ConsulError> {
        let (status, _, body) = self
            .call(
                Method::PUT,
                "/v1/agent/service/register",
                Some(Bytes::from(definition.to_string())),
                Duration::from_secs(10),
            )
            .await?;
        ensure_ok(status, &body)
    }

    pub async fn deregister(&self, id: &str) -> Result<(), ConsulError> {
        let (status, _, body) = self
            .call(
                Method::PUT,
                &format!("/v1/agent/service/deregister/{}", enc(id)),
                None,
                Duration::from_secs(10),
            )
            .await?;
        ensure_ok(status, &body)
    }

    /// The cluster's Raft leader (`GET /v1/status/leader`), e.g. "10.0.0.1:8300"; empty when the
    /// cluster has none. For `hexgate validate --connect`.
    pub async fn leader(&self, timeout: Duration) -> Result<String, ConsulError> {
        let (status, _, body) = self
            .call(Method::GET, "/v1/status/leader", None, timeout)
            .await?;
        ensure_ok(status, &body)?;
        serde_json::from_slice::<String>(&body).map_err(|e| ConsulError::Decode(e.to_string()))
    }
}

/// How an instance says it is spoken to: its service `Meta.protocol` (`http`, `https`, `h2c`, or
/// `grpc`, which is h2c), else the first tag with one of those names.
fn instance_scheme(svc: &serde_json::Value) -> Option<hexgate_config::Scheme> {
    use hexgate_config::Scheme;
    if let Some(s) = svc["Meta"]["protocol"].as_str().and_then(Scheme::parse) {
        return Some(s);
    }
    svc["Tags"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|t| t.as_str().and_then(Scheme::parse))
}

#[cfg(test)]
mod scheme_tests {
    use super::instance_scheme;
    use hexgate_config::Scheme;

    #[test]
    fn the_scheme_comes_from_meta_then_tags() {
        let j = |s: &str| serde_json::from_str::<serde_json::Value>(s).expect("json");
        for (json, want) in [
            (r#"{}"#, None),
            (r#"{"Meta":{"protocol":"grpc"}}"#, Some(Scheme::H2c)),
            (
                r#"{"Meta":{"protocol":"HTTPS"},"Tags":["h2c"]}"#,
                Some(Scheme::Https),
            ),
            (
                r#"{"Meta":{"protocol":"tcp"},"Tags":["v1","https"]}"#,
                Some(Scheme::Https),
            ),
            (r#"{"Meta":null,"Tags":["v1"]}"#, None),
        ] {
            assert_eq!(instance_scheme(&j(json)), want, "{json}");
        }
    }
}
