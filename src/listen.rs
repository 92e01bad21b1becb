//! Listener settings shared by the public and the admin listeners, and by the compile step:
//! the HTTP/1 limits a connection is served with, and the TLS acceptor built from a certificate
//! and key (read by the compile step). Below `server`, `admin` and `compile`, so none of them names another for these.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::TokioTimer;
use tokio_rustls::TlsAcceptor;

use crate::config::Config;

/// A certificate or key that cannot serve TLS; the message names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{0}")]
    Cert(String),
    #[error("{0}")]
    Key(String),
}

/// hyper's own limit on request header fields when none is set (`DEFAULT_MAX_HEADERS`).
const HYPER_DEFAULT_MAX_HEADERS: u64 = 100;

/// The settings an HTTP/1 connection is served with (`Settings::http1` of a snapshot for the
/// admin listener, which applies a reload's values to new connections).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Http1Limits {
    pub header_read: Duration,
    pub idle: Duration,
    pub max_header_size: u64,
    pub max_header_count: u64,
}

impl Http1Limits {
    pub fn of(cfg: &Config) -> Http1Limits {
        Http1Limits {
            header_read: cfg.timeouts.header_read,
            idle: cfg.timeouts.idle,
            max_header_size: cfg.max_header_size,
            max_header_count: cfg.max_header_count,
        }
    }
}

/// The HTTP/1 settings of a listener: `timeouts.headerRead` and `timeouts.idle`, and room for
/// `maxHeaderSize` of header fields (limited exactly by rules::headers) plus the request line, as
/// nginx's 8k large_client_header_buffers.
pub fn http1_builder(cfg: &Http1Limits) -> http1::Builder {
    let mut h1 = http1::Builder::new();
    h1.timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read)
        .idle_timeout(cfg.idle)
        .max_buf_size(usize::try_from(cfg.max_header_size + 8192).unwrap_or(usize::MAX))
        .keep_alive(true);
    // hyper refuses more fields with 431 itself (100 unless told otherwise); the exact count and
    // byte limits for both protocols are rules::headers, applied to every request. Set only when
    // it differs from hyper's 100, so the default keeps hyper's inline header arrays (an explicit
    // limit sizes them per parse, on the heap beyond 100).
    if cfg.max_header_count != HYPER_DEFAULT_MAX_HEADERS {
        h1.max_headers(usize::try_from(cfg.max_header_count).unwrap_or(usize::MAX));
    }
    h1
}

/// The HTTPS acceptor from a PEM certificate chain and key (`cert` and `key` name them in
/// errors): rustls with ring, TLS 1.2 and 1.3, ALPN h2 and http/1.1; refuses a key that does not
/// match the certificate.
pub fn tls_acceptor(
    cert_pem: &[u8],
    cert: &Path,
    key_pem: &[u8],
    key: &Path,
) -> Result<TlsAcceptor, TlsError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Cert(format!("{}: {e}", cert.display())))?;
    if certs.is_empty() {
        return Err(TlsError::Cert(format!(
            "{}: no certificate found",
            cert.display()
        )));
    }
    let private = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| TlsError::Key(format!("{}: {e}", key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Cert(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, private)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => TlsError::Key(format!(
                "{}: the private key does not match the certificate {}",
                key.display(),
                cert.display()
            )),
            other => TlsError::Key(format!("{}: {other}", key.display())),
        })?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}
