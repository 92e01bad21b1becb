//! A small HTTP(S) GET for JWKS documents: one connection per fetch, a time limit and a size limit.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

const MAX_BODY: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("bad URL: {0}")]
    Url(String),
    #[error("timed out")]
    Timeout,
    #[error("{0}")]
    Io(String),
    #[error("HTTP status {0}")]
    Status(u16),
}

fn tls_config() -> Arc<rustls::ClientConfig> {
    static CFG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CFG.get_or_init(|| {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(cert);
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map(|b| b.with_root_certificates(roots).with_no_client_auth())
            .unwrap_or_else(|_| {
                rustls::ClientConfig::builder()
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth()
            });
        Arc::new(cfg)
    })
    .clone()
}

/// GETs `url`; returns the body and the Cache-Control max-age, if any.
pub async fn get(url: &str, timeout: Duration) -> Result<(Bytes, Option<Duration>), FetchError> {
    tokio::time::timeout(timeout, get_inner(url))
        .await
        .map_err(|_| FetchError::Timeout)?
}

async fn get_inner(url: &str) -> Result<(Bytes, Option<Duration>), FetchError> {
    let uri: Uri = url.parse().map_err(|e| FetchError::Url(format!("{e}")))?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(FetchError::Url("scheme must be http or https".into())),
    };
    let host = uri
        .host()
        .ok_or_else(|| FetchError::Url("no host".into()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let authority = uri
        .authority()
        .map(|a| a.as_str().to_string())
        .unwrap_or_default();
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| FetchError::Io(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let req = Request::get(path)
        .header(header::HOST, authority)
        .header(header::ACCEPT, "application/json")
        .header(header::USER_AGENT, "hexgate")
        .body(Empty::<Bytes>::new())
        .map_err(|e| FetchError::Url(e.to_string()))?;
    let resp = if https {
        let name = rustls_pki_types::ServerName::try_from(host.clone())
            .map_err(|e| FetchError::Url(e.to_string()))?;
        let tls = tokio_rustls::TlsConnector::from(tls_config())
            .connect(name, tcp)
            .await
            .map_err(|e| FetchError::Io(e.to_string()))?;
        send(TokioIo::new(tls), req).await?
    } else {
        send(TokioIo::new(tcp), req).await?
    };
    Ok(resp)
}

async fn send<I>(io: I, req: Request<Empty<Bytes>>) -> Result<(Bytes, Option<Duration>), FetchError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| FetchError::Io(e.to_string()))?;
    tokio::spawn(conn);
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| FetchError::Io(e.to_string()))?;
    if !resp.status().is_success() {
        return Err(FetchError::Status(resp.status().as_u16()));
    }
    let max_age = resp
        .headers()
        .get(header::CACHE_CONTROL)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.split(',')
                .filter_map(|d| d.trim().strip_prefix("max-age="))
                .find_map(|s| s.trim().parse::<u64>().ok())
        })
        .map(Duration::from_secs);
    let body = Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| FetchError::Io(e.to_string()))?
        .to_bytes();
    Ok((body, max_age))
}
