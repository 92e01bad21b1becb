//! A small HTTP/1.1 client for control-plane calls (JWKS, Consul): one connection per request,
//! a time limit, a body size limit, http or https (rustls with the system roots or a given CA).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

const MAX_BODY: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("bad URL {0}")]
    Url(String),
    #[error("timed out")]
    Timeout,
    #[error("{0}")]
    Io(String),
}

/// Percent-encodes everything but unreserved characters (RFC 3986), for URL parts.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A URL as it may be shown or logged: userinfo and query values replaced by `<redacted>`
/// (`https://u:p@h/jwks?api_key=x` → `https://<redacted>@h/jwks?api_key=<redacted>`). Works on
/// any string, URL or not; the fragment is dropped.
pub fn redact_url(url: &str) -> String {
    const R: &str = "<redacted>";
    let url = url.split('#').next().unwrap_or("");
    let (before_query, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let mut out = String::with_capacity(url.len() + 16);
    let (scheme, rest) = match before_query.split_once("://") {
        Some((s, r)) => (Some(s), r),
        None => (None, before_query),
    };
    if let Some(s) = scheme {
        out.push_str(s);
        out.push_str("://");
    }
    let auth_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(auth_end);
    match authority.rsplit_once('@') {
        Some((_, host)) => {
            out.push_str(R);
            out.push('@');
            out.push_str(host);
        }
        None => out.push_str(authority),
    }
    out.push_str(path);
    if let Some(q) = query {
        out.push('?');
        for (i, pair) in q.split('&').enumerate() {
            if i > 0 {
                out.push('&');
            }
            match pair.split_once('=') {
                Some((k, _)) => {
                    out.push_str(k);
                    out.push('=');
                    out.push_str(R);
                }
                None if pair.is_empty() => {}
                None => out.push_str(R),
            }
        }
    }
    out
}

/// Where requests go: scheme, host, port; and TLS settings for https.
#[derive(Clone)]
pub struct Endpoint {
    pub https: bool,
    pub host: String,
    pub port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}://{}:{}",
            if self.https { "https" } else { "http" },
            self.host,
            self.port
        )
    }
}

fn system_tls() -> Arc<rustls::ClientConfig> {
    static CFG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CFG.get_or_init(|| tls_with_roots(None).unwrap_or_else(|_| tls_fallback()))
        .clone()
}

fn tls_fallback() -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map(|b| {
                b.with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth()
            })
            .unwrap_or_else(|_| {
                rustls::ClientConfig::builder()
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth()
            }),
    )
}

/// A client config trusting `ca_file` (PEM) if given, else the system roots.
pub fn tls_with_roots(ca_file: Option<&str>) -> Result<Arc<rustls::ClientConfig>, HttpError> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
                .map_err(|e| HttpError::Io(format!("{path}: {e}")))?;
            for c in certs {
                let c = c.map_err(|e| HttpError::Io(format!("{path}: {e}")))?;
                roots
                    .add(c)
                    .map_err(|e| HttpError::Io(format!("{path}: {e}")))?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| HttpError::Io(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

impl Endpoint {
    /// Parses `http://host:port`, `https://host`, or a bare `host:port` (http unless `https`).
    pub fn parse(addr: &str, https: bool, ca_file: Option<&str>) -> Result<Endpoint, HttpError> {
        let with_scheme = if addr.contains("://") {
            addr.to_string()
        } else {
            format!("{}://{addr}", if https { "https" } else { "http" })
        };
        let uri: Uri = with_scheme
            .parse()
            .map_err(|_| HttpError::Url(addr.to_string()))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(HttpError::Url(addr.to_string())),
        };
        let host = uri
            .host()
            .ok_or_else(|| HttpError::Url(addr.to_string()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tls = if https {
            Some(match ca_file {
                Some(_) => tls_with_roots(ca_file)?,
                None => system_tls(),
            })
        } else {
            None
        };
        Ok(Endpoint {
            https,
            host,
            port,
            tls,
        })
    }

    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Sends one request; returns status, headers and the whole body.
    pub async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        headers: &[(&str, &str)],
        body: Option<Bytes>,
        timeout: Duration,
    ) -> Result<(StatusCode, HeaderMap, Bytes), HttpError> {
        tokio::time::timeout(
            timeout,
            self.send_inner(method, path_and_query, headers, body),
        )
        .await
        .map_err(|_| HttpError::Timeout)?
    }

    async fn send_inner(
        &self,
        method: Method,
        path_and_query: &str,
        headers: &[(&str, &str)],
        body: Option<Bytes>,
    ) -> Result<(StatusCode, HeaderMap, Bytes), HttpError> {
        let mut b = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(header::HOST, self.authority())
            .header(header::USER_AGENT, "hexgate");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| HttpError::Url(e.to_string()))?;
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| HttpError::Io(format!("{self:?}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            Some(cfg) => {
                let name = rustls_pki_types::ServerName::try_from(self.host.clone())
                    .map_err(|e| HttpError::Url(e.to_string()))?;
                let tls = tokio_rustls::TlsConnector::from(cfg.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| HttpError::Io(format!("{self:?}: TLS: {e}")))?;
                exchange(TokioIo::new(tls), req).await
            }
            None => exchange(TokioIo::new(tcp), req).await,
        }
    }
}

async fn exchange<I>(
    io: I,
    req: Request<Full<Bytes>>,
) -> Result<(StatusCode, HeaderMap, Bytes), HttpError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| HttpError::Io(e.to_string()))?;
    tokio::spawn(conn);
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| HttpError::Io(e.to_string()))?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| HttpError::Io(e.to_string()))?
        .to_bytes();
    Ok((status, headers, body))
}

/// GETs a full URL; returns the body (2xx only) and the Cache-Control max-age, if any.
pub async fn get_url(url: &str, timeout: Duration) -> Result<(Bytes, Option<Duration>), HttpError> {
    let uri: Uri = url.parse().map_err(|_| HttpError::Url(url.to_string()))?;
    let authority = uri
        .authority()
        .ok_or_else(|| HttpError::Url(url.to_string()))?;
    let base = format!(
        "{}://{}",
        uri.scheme_str().unwrap_or("http"),
        authority.as_str()
    );
    let ep = Endpoint::parse(&base, false, None)?;
    let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let (status, headers, body) = ep
        .send(
            Method::GET,
            pq,
            &[("accept", "application/json")],
            None,
            timeout,
        )
        .await?;
    if !status.is_success() {
        return Err(HttpError::Io(format!("HTTP status {}", status.as_u16())));
    }
    let max_age = headers
        .get(header::CACHE_CONTROL)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.split(',')
                .filter_map(|d| d.trim().strip_prefix("max-age="))
                .find_map(|s| s.trim().parse::<u64>().ok())
        })
        .map(Duration::from_secs);
    Ok((body, max_age))
}
