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
/// (`https://u:p@h/jwks?api_key=x` → `https://<redacted>@h/jwks?api_key=<redacted>`); query
/// keys, scheme, host, port and path are kept; the fragment is dropped. Works on any string,
/// URL or not, and errs on the side of hiding: when the authority is not a plausible
/// `host[:port]` (a password with a raw `/`, `?` or `#`, as in `http://u:p/w@h`), everything up
/// to the last `@` is treated as userinfo. Idempotent: redacting twice changes nothing.
pub fn redact_url(url: &str) -> String {
    /// Whether `s` looks like `host`, `host:port` or `[v6]:port` (a port of digits only), for
    /// `redact_url`: `user:secret` does not.
    fn plausible_host_port(s: &str) -> bool {
        let after_host = match s.strip_prefix('[') {
            Some(v6) => match v6.split_once(']') {
                Some((_, after)) => after,
                None => return false,
            },
            None => match s.rsplit_once(':') {
                Some((host, _)) if host.contains(':') => return false,
                Some((_, port)) => return port.bytes().all(|b| b.is_ascii_digit()),
                None => return true,
            },
        };
        match after_host.strip_prefix(':') {
            Some(port) => port.bytes().all(|b| b.is_ascii_digit()),
            None => after_host.is_empty(),
        }
    }

    const R: &str = "<redacted>";
    let mut out = String::with_capacity(url.len() + 16);
    // The scheme counts only when `://` comes before any query or fragment.
    let head_end = url.find(['?', '#']).unwrap_or(url.len());
    let rest = match url[..head_end].find("://") {
        Some(i) => {
            out.push_str(&url[..i + 3]);
            &url[i + 3..]
        }
        None => url,
    };
    let auth_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..auth_end];
    let userinfo_end = if authority.contains('@') {
        authority.rfind('@')
    } else if !plausible_host_port(authority) {
        rest.rfind('@')
    } else {
        None
    };
    let rest = match userinfo_end {
        Some(i) => {
            out.push_str(R);
            out.push('@');
            &rest[i + 1..]
        }
        None => rest,
    };
    // What follows the userinfo: host, path, query; the fragment is dropped.
    let rest = rest.split('#').next().unwrap_or("");
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    out.push_str(before_query);
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

/// `host:port` as a URI authority: an IPv6 address in brackets.
pub fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
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

/// The trust anchors in a PEM file's contents (`name` names it in errors); at least one.
pub fn roots_from_pem(pem: &[u8], name: &str) -> Result<rustls::RootCertStore, HttpError> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(pem) {
        let c = c.map_err(|e| HttpError::Io(format!("{name}: {e}")))?;
        roots
            .add(c)
            .map_err(|e| HttpError::Io(format!("{name}: {e}")))?;
    }
    if roots.is_empty() {
        return Err(HttpError::Io(format!("{name}: no certificate found")));
    }
    Ok(roots)
}

/// A client config trusting `ca_file` (PEM) if given, else the system roots.
pub fn tls_with_roots(ca_file: Option<&str>) -> Result<Arc<rustls::ClientConfig>, HttpError> {
    let roots = match ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| HttpError::Io(format!("{path}: {e}")))?;
            roots_from_pem(&pem, path)?
        }
        None => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
            roots
        }
    };
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
            .map_err(|_| HttpError::Url(redact_url(addr)))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(HttpError::Url(redact_url(addr))),
        };
        let host = uri
            .host()
            .ok_or_else(|| HttpError::Url(redact_url(addr)))?
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
        authority(&self.host, self.port)
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
    let uri: Uri = url.parse().map_err(|_| HttpError::Url(redact_url(url)))?;
    let authority = uri
        .authority()
        .ok_or_else(|| HttpError::Url(redact_url(url)))?;
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

#[cfg(test)]
mod tests {
    use super::redact_url;

    const R: &str = "<redacted>";

    #[test]
    fn userinfo_is_redacted() {
        assert_eq!(
            redact_url("https://user:s3cret@idp.example.com/jwks"),
            format!("https://{R}@idp.example.com/jwks")
        );
        // User only, password only, a ':' in the password, no scheme.
        assert_eq!(
            redact_url("http://token@consul:8500"),
            format!("http://{R}@consul:8500")
        );
        assert_eq!(
            redact_url("redis://:pw@redis:6379/0"),
            format!("redis://{R}@redis:6379/0")
        );
        assert_eq!(redact_url("http://u:a:b@h:1/"), format!("http://{R}@h:1/"));
        assert_eq!(redact_url("user:pass@h:8500"), format!("{R}@h:8500"));
    }

    #[test]
    fn query_values_are_redacted_keys_kept() {
        assert_eq!(
            redact_url("https://idp/jwks?api_key=abc123&v=2"),
            format!("https://idp/jwks?api_key={R}&v={R}")
        );
        // A bare value, an empty pair, an empty value.
        assert_eq!(
            redact_url("https://idp/jwks?abc123&&k="),
            format!("https://idp/jwks?{R}&&k={R}")
        );
        // A URL inside a query value is hidden with the value.
        assert_eq!(
            redact_url("http://h/cb?next=http://u:p@x/y"),
            format!("http://h/cb?next={R}")
        );
        let both = redact_url("https://u:p@idp:8443/a/b?api_key=abc123");
        assert_eq!(both, format!("https://{R}@idp:8443/a/b?api_key={R}"));
        assert!(!both.contains("abc123") && !both.contains("u:p"));
    }

    #[test]
    fn nothing_to_hide_is_unchanged() {
        for u in [
            "https://idp.example.com/.well-known/jwks.json",
            "http://consul:8500",
            "consul:8500",
            "redis:6379",
            "http://h/",
            "",
        ] {
            assert_eq!(redact_url(u), u);
        }
    }

    #[test]
    fn ipv6_hosts() {
        assert_eq!(redact_url("http://[::1]:8500/v1"), "http://[::1]:8500/v1");
        assert_eq!(
            redact_url("http://u:p@[2001:db8::1]:8500/v1?token=t"),
            format!("http://{R}@[2001:db8::1]:8500/v1?token={R}")
        );
        assert_eq!(redact_url("[::1]:6379"), "[::1]:6379");
    }

    #[test]
    fn at_sign_in_path_is_not_userinfo() {
        assert_eq!(
            redact_url("https://h/users/@me/keys"),
            "https://h/users/@me/keys"
        );
        assert_eq!(
            redact_url("https://u:p@h/users/@me?k=v"),
            format!("https://{R}@h/users/@me?k={R}")
        );
    }

    #[test]
    fn raw_delimiters_in_a_password_do_not_leak_it() {
        for (url, secret) in [
            ("http://admin:p/ss@consul:8500", "p/ss"),
            ("http://admin:p?ss@consul:8500", "p?ss"),
            ("http://admin:p#ss@consul:8500/x", "p#ss"),
        ] {
            let shown = redact_url(url);
            assert!(
                shown.starts_with(&format!("http://{R}@consul:8500")),
                "{url} -> {shown}"
            );
            assert!(
                !shown.contains(secret) && !shown.contains("admin"),
                "{url} -> {shown}"
            );
        }
    }

    #[test]
    fn fragment_is_dropped() {
        assert_eq!(redact_url("https://h/cb#access_token=xyz"), "https://h/cb");
        assert_eq!(
            redact_url("https://h/cb?a=1#frag"),
            format!("https://h/cb?a={R}")
        );
    }

    #[test]
    fn idempotent() {
        for u in [
            "https://u:p@h/jwks?api_key=x#f",
            "http://admin:p/ss@consul:8500",
            "http://[::1]:1/?a&b=c",
        ] {
            let once = redact_url(u);
            assert_eq!(redact_url(&once), once, "{u}");
        }
    }
}
