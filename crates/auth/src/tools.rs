//! `hexgate keygen` and `hexgate token`: key pairs and signed tokens for trying the gateway out.

use std::io::Write as _;
use std::path::Path;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, RsaKeyPair};

use super::keys::{pem_blocks, Alg};

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("{0}: already exists (use --force to overwrite)")]
    Exists(String),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("key generation failed: {0}")]
    Keygen(String),
    #[error("{0}")]
    Key(String),
    #[error("signing failed")]
    Sign,
}

/// A private key able to sign tokens.
pub enum SigningKey {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair, Alg),
    Ed(Ed25519KeyPair),
}

impl SigningKey {
    pub fn default_alg(&self) -> Alg {
        match self {
            SigningKey::Rsa(_) => Alg::RS256,
            SigningKey::Ec(_, a) => *a,
            SigningKey::Ed(_) => Alg::EdDSA,
        }
    }

    /// Loads a PEM private key: PKCS#8 ("PRIVATE KEY", any supported type) or PKCS#1 RSA.
    pub fn from_pem(text: &str) -> Result<SigningKey, ToolError> {
        let blocks = pem_blocks(text).map_err(|e| ToolError::Key(e.to_string()))?;
        let rng = SystemRandom::new();
        for (label, der) in blocks {
            match label.as_str() {
                "RSA PRIVATE KEY" => {
                    return RsaKeyPair::from_der(&der)
                        .map(SigningKey::Rsa)
                        .map_err(|e| ToolError::Key(format!("RSA key rejected: {e}")))
                }
                "PRIVATE KEY" => {
                    if let Ok(k) = RsaKeyPair::from_pkcs8(&der) {
                        return Ok(SigningKey::Rsa(k));
                    }
                    if let Ok(k) = EcdsaKeyPair::from_pkcs8(
                        &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                        &der,
                        &rng,
                    ) {
                        return Ok(SigningKey::Ec(k, Alg::ES256));
                    }
                    if let Ok(k) = EcdsaKeyPair::from_pkcs8(
                        &signature::ECDSA_P384_SHA384_FIXED_SIGNING,
                        &der,
                        &rng,
                    ) {
                        return Ok(SigningKey::Ec(k, Alg::ES384));
                    }
                    if let Ok(k) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der) {
                        return Ok(SigningKey::Ed(k));
                    }
                    return Err(ToolError::Key(
                        "unsupported PKCS#8 key (RSA, EC P-256/P-384 and Ed25519 are supported)"
                            .into(),
                    ));
                }
                "EC PRIVATE KEY" => return Err(ToolError::Key(
                    "SEC1 EC keys are not supported; convert with `openssl pkcs8 -topk8 -nocrypt`"
                        .into(),
                )),
                _ => {}
            }
        }
        Err(ToolError::Key("no PRIVATE KEY block found".into()))
    }

    fn sign(&self, alg: Alg, msg: &[u8]) -> Result<Vec<u8>, ToolError> {
        let rng = SystemRandom::new();
        match (self, alg) {
            (SigningKey::Rsa(k), _) => {
                let enc: &'static dyn signature::RsaEncoding = match alg {
                    Alg::RS256 => &signature::RSA_PKCS1_SHA256,
                    Alg::RS384 => &signature::RSA_PKCS1_SHA384,
                    Alg::RS512 => &signature::RSA_PKCS1_SHA512,
                    Alg::PS256 => &signature::RSA_PSS_SHA256,
                    Alg::PS384 => &signature::RSA_PSS_SHA384,
                    Alg::PS512 => &signature::RSA_PSS_SHA512,
                    _ => {
                        return Err(ToolError::Key(format!(
                            "{} needs a non-RSA key",
                            alg.name()
                        )))
                    }
                };
                let mut sig = vec![0; k.public().modulus_len()];
                k.sign(enc, &rng, msg, &mut sig)
                    .map_err(|_| ToolError::Sign)?;
                Ok(sig)
            }
            (SigningKey::Ec(k, a), _) if *a == alg => k
                .sign(&rng, msg)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| ToolError::Sign),
            (SigningKey::Ed(k), Alg::EdDSA) => Ok(k.sign(msg).as_ref().to_vec()),
            _ => Err(ToolError::Key(format!(
                "this key cannot sign {}",
                alg.name()
            ))),
        }
    }
}

/// Signs a compact JWS with `header` fields added to `{"alg","typ"}`.
pub fn sign_token(
    key: &SigningKey,
    alg: Alg,
    kid: Option<&str>,
    claims: &serde_json::Value,
) -> Result<String, ToolError> {
    let mut header = serde_json::json!({"alg": alg.name(), "typ": "JWT"});
    if let Some(k) = kid {
        header["kid"] = serde_json::Value::String(k.to_string());
    }
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig = key.sign(alg, input.as_bytes())?;
    Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig)))
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn der_len(len: usize) -> Vec<u8> {
    if len < 0x80 {
        vec![len as u8]
    } else if len < 0x100 {
        vec![0x81, len as u8]
    } else {
        vec![0x82, (len >> 8) as u8, len as u8]
    }
}

fn der(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend(der_len(body.len()));
    v.extend_from_slice(body);
    v
}

/// SubjectPublicKeyInfo DER for a raw public key under `alg_id` (the AlgorithmIdentifier body).
fn spki(alg_id: &[u8], key: &[u8]) -> Vec<u8> {
    let mut bits = vec![0u8];
    bits.extend_from_slice(key);
    let mut body = der(0x30, alg_id);
    body.extend(der(0x03, &bits));
    der(0x30, &body)
}

/// (private PEM, public PEM) for a new key of `alg`'s family.
pub fn generate(alg: Alg) -> Result<(String, String), ToolError> {
    let rng = SystemRandom::new();
    match alg {
        Alg::RS256 | Alg::RS384 | Alg::RS512 | Alg::PS256 | Alg::PS384 | Alg::PS512 => {
            use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
            let key = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048)
                .map_err(|e| ToolError::Keygen(e.to_string()))?;
            let private = key
                .to_pkcs8_pem(LineEnding::LF)
                .map_err(|e| ToolError::Keygen(e.to_string()))?
                .to_string();
            let public = key
                .to_public_key()
                .to_public_key_pem(LineEnding::LF)
                .map_err(|e| ToolError::Keygen(e.to_string()))?;
            Ok((private, public))
        }
        Alg::ES256 | Alg::ES384 => {
            let (signing, curve_oid): (&'static signature::EcdsaSigningAlgorithm, &[u8]) =
                if alg == Alg::ES256 {
                    (
                        &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                        &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07],
                    )
                } else {
                    (
                        &signature::ECDSA_P384_SHA384_FIXED_SIGNING,
                        &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22],
                    )
                };
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(signing, &rng)
                .map_err(|e| ToolError::Keygen(e.to_string()))?;
            let kp = EcdsaKeyPair::from_pkcs8(signing, pkcs8.as_ref(), &rng)
                .map_err(|e| ToolError::Keygen(e.to_string()))?;
            let mut alg_id = vec![0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
            alg_id.extend_from_slice(curve_oid);
            Ok((
                pem("PRIVATE KEY", pkcs8.as_ref()),
                pem("PUBLIC KEY", &spki(&alg_id, kp.public_key().as_ref())),
            ))
        }
        Alg::EdDSA => {
            let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng)
                .map_err(|e| ToolError::Keygen(e.to_string()))?;
            let kp = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
                .map_err(|e| ToolError::Keygen(e.to_string()))?;
            Ok((
                pem("PRIVATE KEY", pkcs8.as_ref()),
                pem(
                    "PUBLIC KEY",
                    &spki(&[0x06, 0x03, 0x2b, 0x65, 0x70], kp.public_key().as_ref()),
                ),
            ))
        }
    }
}

fn write_file(path: &Path, text: &str, mode: u32, force: bool) -> Result<(), ToolError> {
    let name = path.display().to_string();
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true);
    if force {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    let mut f = opts.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            ToolError::Exists(name.clone())
        } else {
            ToolError::Io(name.clone(), e)
        }
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = f.set_permissions(std::fs::Permissions::from_mode(mode));
    }
    f.write_all(text.as_bytes())
        .map_err(|e| ToolError::Io(name, e))
}

/// Writes DIR/private.pem (0600) and DIR/public.pem (0644).
pub fn keygen(dir: &Path, alg: Alg, force: bool) -> Result<(), ToolError> {
    std::fs::create_dir_all(dir).map_err(|e| ToolError::Io(dir.display().to_string(), e))?;
    let private_path = dir.join("private.pem");
    let public_path = dir.join("public.pem");
    if !force {
        for p in [&private_path, &public_path] {
            if p.exists() {
                return Err(ToolError::Exists(p.display().to_string()));
            }
        }
    }
    let (private, public) = generate(alg)?;
    write_file(&private_path, &private, 0o600, force)?;
    write_file(&public_path, &public, 0o644, force)?;
    Ok(())
}
