//! TLS to backends (`https://`): one rustls client config per service and ALPN offer, built by
//! compile from the files `upstreamTls` names, and the reasons a handshake fails, as the
//! `reason` label of `hexgate_upstream_errors_total` says them.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};

/// What `upstreamTls` names, read from disk by compile (so a bad file is refused before anything
/// runs): each file as `(shown name, bytes)`.
#[derive(Debug, Clone, Default)]
pub struct TlsMaterial {
    pub ca: Option<(String, Vec<u8>)>,
    pub cert: Option<(String, Vec<u8>)>,
    pub key: Option<(String, Vec<u8>)>,
    pub server_name: Option<String>,
    pub insecure_skip_verify: bool,
}

/// Why `upstreamTls` cannot be used; each names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("{0}: {1}")]
    Ca(String, String),
    #[error("{0}: {1}")]
    Cert(String, String),
    #[error("{0}: {1}")]
    Key(String, String),
    #[error("{0}")]
    Other(String),
}

/// Which HTTP versions a TLS connection offers by ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Alpn {
    /// `h2` and `http/1.1`: the backend chooses.
    Both,
    Http1,
    Http2,
}

/// The client side of TLS to one service's backends.
pub struct ClientTls {
    both: Arc<ClientConfig>,
    http1: Arc<ClientConfig>,
    http2: Arc<ClientConfig>,
    /// `serverName`, else each backend's own host.
    pub server_name: Option<ServerName<'static>>,
    client_key: Option<Arc<CertifiedKey>>,
    pub insecure: bool,
    /// Equal for equal settings and file contents: backends are shared (with their connections)
    /// only between services whose TLS is the same.
    pub fingerprint: u64,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .field("client_cert", &self.client_key.is_some())
            .field("insecure", &self.insecure)
            .finish()
    }
}

/// The system's trusted roots, read once per process.
fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| rustls_native_certs::load_native_certs().certs)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl ClientTls {
    /// Builds the client configs; fails on a file that holds no usable certificate or key, or a
    /// key that does not belong to its certificate.
    pub fn build(m: &TlsMaterial) -> Result<ClientTls, TlsConfigError> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for c in system_roots() {
            let _ = roots.add(c.clone());
        }
        if let Some((name, pem)) = &m.ca {
            let mut n = 0;
            for c in CertificateDer::pem_slice_iter(pem) {
                let c = c.map_err(|e| TlsConfigError::Ca(name.clone(), e.to_string()))?;
                roots
                    .add(c)
                    .map_err(|e| TlsConfigError::Ca(name.clone(), e.to_string()))?;
                n += 1;
            }
            if n == 0 {
                return Err(TlsConfigError::Ca(
                    name.clone(),
                    "no PEM certificate found".into(),
                ));
            }
        }
        let provider = provider();
        let client_key = match (&m.cert, &m.key) {
            (Some((cname, cpem)), Some((kname, kpem))) => {
                let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cpem)
                    .collect::<Result<_, _>>()
                    .map_err(|e| TlsConfigError::Cert(cname.clone(), e.to_string()))?;
                if chain.is_empty() {
                    return Err(TlsConfigError::Cert(
                        cname.clone(),
                        "no PEM certificate found".into(),
                    ));
                }
                let key = PrivateKeyDer::from_pem_slice(kpem).map_err(|e| {
                    TlsConfigError::Key(kname.clone(), format!("no usable PEM private key: {e}"))
                })?;
                let signer = provider
                    .key_provider
                    .load_private_key(key)
                    .map_err(|e| TlsConfigError::Key(kname.clone(), e.to_string()))?;
                let ck = CertifiedKey::new(chain, signer);
                ck.keys_match().map_err(|e| {
                    TlsConfigError::Key(
                        kname.clone(),
                        format!("does not belong to the certificate in {cname}: {e}"),
                    )
                })?;
                Some(Arc::new(ck))
            }
            _ => None,
        };
        let server_name = match &m.server_name {
            Some(n) => Some(
                ServerName::try_from(n.clone())
                    .map_err(|e| TlsConfigError::Other(format!("serverName {n:?}: {e}")))?,
            ),
            None => None,
        };
        let base = {
            let b = ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| TlsConfigError::Other(e.to_string()))?;
            let b = if m.insecure_skip_verify {
                b.dangerous()
                    .with_custom_certificate_verifier(Arc::new(NoVerify(provider.clone())))
            } else {
                b.with_root_certificates(roots)
            };
            b.with_client_cert_resolver(Arc::new(Presented {
                key: client_key.clone(),
                asked: Arc::new(AtomicBool::new(false)),
            }))
        };
        let with_alpn = |protos: &[&[u8]]| {
            let mut c = base.clone();
            c.alpn_protocols = protos.iter().map(|p| p.to_vec()).collect();
            Arc::new(c)
        };
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for part in [&m.ca, &m.cert, &m.key] {
            part.as_ref().map(|(_, b)| b).hash(&mut h);
        }
        m.server_name.hash(&mut h);
        m.insecure_skip_verify.hash(&mut h);
        Ok(ClientTls {
            both: with_alpn(&[b"h2", b"http/1.1"]),
            http1: with_alpn(&[b"http/1.1"]),
            http2: with_alpn(&[b"h2"]),
            server_name,
            client_key,
            insecure: m.insecure_skip_verify,
            fingerprint: h.finish(),
        })
    }

    /// A config for one new connection, and a flag set if the backend asks for a client
    /// certificate during the handshake (so a 400 that follows can be told apart, see
    /// `Backend::client_cert_missing`).
    pub(crate) fn for_connection(&self, alpn: Alpn) -> (Arc<ClientConfig>, Arc<AtomicBool>) {
        let base = match alpn {
            Alpn::Both => &self.both,
            Alpn::Http1 => &self.http1,
            Alpn::Http2 => &self.http2,
        };
        let asked = Arc::new(AtomicBool::new(false));
        let mut cfg = (**base).clone();
        cfg.client_auth_cert_resolver = Arc::new(Presented {
            key: self.client_key.clone(),
            asked: asked.clone(),
        });
        (Arc::new(cfg), asked)
    }

    pub fn has_client_cert(&self) -> bool {
        self.client_key.is_some()
    }
}

/// Presents the configured client certificate, if any, and notes that the backend asked.
#[derive(Debug)]
struct Presented {
    key: Option<Arc<CertifiedKey>>,
    asked: Arc<AtomicBool>,
}

impl ResolvesClientCert for Presented {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.asked.store(true, Ordering::Relaxed);
        self.key.clone()
    }

    fn has_certs(&self) -> bool {
        self.key.is_some()
    }
}

/// `insecureSkipVerify: true`: any certificate, any name; signatures are still checked so the
/// handshake stays well-formed.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The `reason` of a TLS failure found anywhere in an error's chain: `tls_unknown_ca`,
/// `tls_name_mismatch`, `tls_expired`, `tls_client_cert_refused` (the backend refused the
/// certificate presented, or wanted one: an alert after the handshake) or `tls_handshake`.
pub fn tls_reason(err: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    let mut cur = Some(err);
    while let Some(e) = cur {
        let found = e.downcast_ref::<E>().or_else(|| {
            e.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<E>())
        });
        if let Some(r) = found {
            return Some(match r {
                E::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => "tls_unknown_ca",
                E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
                    "tls_name_mismatch"
                }
                E::InvalidCertificate(
                    C::Expired
                    | C::ExpiredContext { .. }
                    | C::NotValidYet
                    | C::NotValidYetContext { .. },
                ) => "tls_expired",
                E::AlertReceived(
                    A::CertificateRequired
                    | A::BadCertificate
                    | A::UnknownCA
                    | A::CertificateUnknown
                    | A::CertificateExpired
                    | A::CertificateRevoked
                    | A::UnsupportedCertificate
                    | A::AccessDenied,
                ) => "tls_client_cert_refused",
                _ => "tls_handshake",
            });
        }
        cur = e.source();
    }
    None
}
