//! Verification keys: PEM files (SPKI "PUBLIC KEY" or PKCS#1 "RSA PUBLIC KEY") and JWK Sets.
//! Each key is bound to the algorithm family it may verify, so a key can never be used with an
//! algorithm of another family (no RSA key as an HMAC secret, no EC key for RSA).

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("no PEM block found")]
    NoPem,
    #[error("bad PEM: {0}")]
    BadPem(String),
    #[error("unsupported key: {0}")]
    Unsupported(String),
    #[error("bad JWKS: {0}")]
    BadJwks(String),
}

/// JWS algorithms HexGate verifies (asymmetric only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Alg {
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
    ES256,
    ES384,
    EdDSA,
}

impl Alg {
    pub fn parse(s: &str) -> Option<Alg> {
        Some(match s {
            "RS256" => Alg::RS256,
            "RS384" => Alg::RS384,
            "RS512" => Alg::RS512,
            "PS256" => Alg::PS256,
            "PS384" => Alg::PS384,
            "PS512" => Alg::PS512,
            "ES256" => Alg::ES256,
            "ES384" => Alg::ES384,
            "EdDSA" => Alg::EdDSA,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Alg::RS256 => "RS256",
            Alg::RS384 => "RS384",
            Alg::RS512 => "RS512",
            Alg::PS256 => "PS256",
            Alg::PS384 => "PS384",
            Alg::PS512 => "PS512",
            Alg::ES256 => "ES256",
            Alg::ES384 => "ES384",
            Alg::EdDSA => "EdDSA",
        }
    }
}

/// Key material by family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Material {
    /// PKCS#1 RSAPublicKey DER.
    RsaDer(Vec<u8>),
    /// Modulus and exponent, big-endian (from a JWK).
    RsaComponents {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// Uncompressed point (0x04 || x || y).
    P256(Vec<u8>),
    P384(Vec<u8>),
    Ed25519(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    pub kid: Option<String>,
    /// A JWK's own "alg", which then restricts the key to exactly that algorithm.
    pub alg: Option<Alg>,
    pub material: Material,
    /// Where it came from, for logs.
    pub source: String,
}

impl Key {
    /// Whether this key may verify `alg` at all.
    pub fn fits(&self, alg: Alg) -> bool {
        if self.alg.is_some_and(|a| a != alg) {
            return false;
        }
        matches!(
            (&self.material, alg),
            (
                Material::RsaDer(_) | Material::RsaComponents { .. },
                Alg::RS256 | Alg::RS384 | Alg::RS512 | Alg::PS256 | Alg::PS384 | Alg::PS512
            ) | (Material::P256(_), Alg::ES256)
                | (Material::P384(_), Alg::ES384)
                | (Material::Ed25519(_), Alg::EdDSA)
        )
    }

    /// Verifies `sig` over `msg`. Callers check `fits` first; a misfit is simply false.
    pub fn verify(&self, alg: Alg, msg: &[u8], sig: &[u8]) -> bool {
        if !self.fits(alg) {
            return false;
        }
        let rsa_params: Option<&'static signature::RsaParameters> = match alg {
            Alg::RS256 => Some(&signature::RSA_PKCS1_2048_8192_SHA256),
            Alg::RS384 => Some(&signature::RSA_PKCS1_2048_8192_SHA384),
            Alg::RS512 => Some(&signature::RSA_PKCS1_2048_8192_SHA512),
            Alg::PS256 => Some(&signature::RSA_PSS_2048_8192_SHA256),
            Alg::PS384 => Some(&signature::RSA_PSS_2048_8192_SHA384),
            Alg::PS512 => Some(&signature::RSA_PSS_2048_8192_SHA512),
            _ => None,
        };
        match (&self.material, rsa_params) {
            (Material::RsaDer(der), Some(p)) => {
                UnparsedPublicKey::new(p, der).verify(msg, sig).is_ok()
            }
            (Material::RsaComponents { n, e }, Some(p)) => {
                RsaPublicKeyComponents { n, e }.verify(p, msg, sig).is_ok()
            }
            (Material::P256(pt), None) => {
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, pt)
                    .verify(msg, sig)
                    .is_ok()
            }
            (Material::P384(pt), None) => {
                UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, pt)
                    .verify(msg, sig)
                    .is_ok()
            }
            (Material::Ed25519(k), None) => UnparsedPublicKey::new(&signature::ED25519, k)
                .verify(msg, sig)
                .is_ok(),
            _ => false,
        }
    }
}

/// All PEM blocks in `text`: (label, DER).
pub fn pem_blocks(text: &str) -> Result<Vec<(String, Vec<u8>)>, KeyError> {
    let mut out = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let line = line.trim();
        let Some(label) = line
            .strip_prefix("-----BEGIN ")
            .and_then(|l| l.strip_suffix("-----"))
        else {
            continue;
        };
        let end = format!("-----END {label}-----");
        let mut b64 = String::new();
        let mut closed = false;
        for l in lines.by_ref() {
            let l = l.trim();
            if l == end {
                closed = true;
                break;
            }
            if !l.contains(':') {
                b64.push_str(l);
            }
        }
        if !closed {
            return Err(KeyError::BadPem(format!("missing {end}")));
        }
        let der = STANDARD
            .decode(b64.as_bytes())
            .map_err(|e| KeyError::BadPem(format!("{label}: {e}")))?;
        out.push((label.to_string(), der));
    }
    if out.is_empty() {
        return Err(KeyError::NoPem);
    }
    Ok(out)
}

// --- a minimal DER reader, enough for SubjectPublicKeyInfo ---

fn der_read(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *input.first()?;
    let first = *input.get(1)?;
    let (len, hdr) = if first < 0x80 {
        (first as usize, 2)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | *input.get(2 + i)? as usize;
        }
        (len, 2 + n)
    };
    let body = input.get(hdr..hdr.checked_add(len)?)?;
    Some((tag, body, &input[hdr + len..]))
}

const OID_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const OID_EC: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];
const OID_ED25519: &[u8] = &[0x2b, 0x65, 0x70];

/// Parses a DER SubjectPublicKeyInfo.
pub fn from_spki(der: &[u8]) -> Result<Material, KeyError> {
    let bad = || KeyError::BadPem("malformed SubjectPublicKeyInfo".into());
    let (tag, spki, _) = der_read(der).ok_or_else(bad)?;
    if tag != 0x30 {
        return Err(bad());
    }
    let (tag, alg_id, rest) = der_read(spki).ok_or_else(bad)?;
    if tag != 0x30 {
        return Err(bad());
    }
    let (tag, bits, _) = der_read(rest).ok_or_else(bad)?;
    if tag != 0x03 || bits.first() != Some(&0) {
        return Err(bad());
    }
    let key = bits[1..].to_vec();
    let (tag, oid, params) = der_read(alg_id).ok_or_else(bad)?;
    if tag != 0x06 {
        return Err(bad());
    }
    if oid == OID_RSA {
        Ok(Material::RsaDer(key))
    } else if oid == OID_EC {
        let (_, curve, _) = der_read(params).ok_or_else(bad)?;
        if curve == OID_P256 {
            Ok(Material::P256(key))
        } else if curve == OID_P384 {
            Ok(Material::P384(key))
        } else {
            Err(KeyError::Unsupported(
                "EC curve (P-256 and P-384 are supported)".into(),
            ))
        }
    } else if oid == OID_ED25519 {
        Ok(Material::Ed25519(key))
    } else {
        Err(KeyError::Unsupported(
            "key algorithm (RSA, EC P-256/P-384, Ed25519 are supported)".into(),
        ))
    }
}

/// Public keys from PEM text: "PUBLIC KEY" (SPKI) or "RSA PUBLIC KEY" (PKCS#1).
pub fn from_pem(text: &str, source: &str) -> Result<Vec<Key>, KeyError> {
    let mut keys = Vec::new();
    for (label, der) in pem_blocks(text)? {
        let material = match label.as_str() {
            "PUBLIC KEY" => from_spki(&der)?,
            "RSA PUBLIC KEY" => Material::RsaDer(der),
            l if l.contains("PRIVATE KEY") => {
                return Err(KeyError::Unsupported(
                    "this is a private key; give the gateway the public key".into(),
                ))
            }
            _ => continue,
        };
        keys.push(Key {
            kid: None,
            alg: None,
            material,
            source: source.to_string(),
        });
    }
    if keys.is_empty() {
        return Err(KeyError::Unsupported("no PUBLIC KEY block".into()));
    }
    Ok(keys)
}

fn b64url(v: &serde_json::Value, field: &str) -> Result<Vec<u8>, KeyError> {
    let s = v
        .get(field)
        .and_then(|x| x.as_str())
        .ok_or_else(|| KeyError::BadJwks(format!("missing \"{field}\"")))?;
    URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .map_err(|_| KeyError::BadJwks(format!("\"{field}\" is not base64url")))
}

/// Keys from a JWK Set document. Keys marked for encryption, symmetric keys and unknown types are
/// skipped; a document with no usable key is an error. `source` (the JWKS URL) is kept on each
/// key with its userinfo and query values redacted, since it is there for logs.
pub fn from_jwks(json: &[u8], source: &str) -> Result<Vec<Key>, KeyError> {
    let source = hexgate_http::httpc::redact_url(source);
    let doc: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| KeyError::BadJwks(e.to_string()))?;
    let list = doc
        .get("keys")
        .and_then(|k| k.as_array())
        .ok_or_else(|| KeyError::BadJwks("no \"keys\" array".into()))?;
    let mut keys = Vec::new();
    for jwk in list {
        if jwk
            .get("use")
            .and_then(|u| u.as_str())
            .is_some_and(|u| u != "sig")
        {
            continue;
        }
        let alg = match jwk.get("alg").and_then(|a| a.as_str()) {
            Some(a) => match Alg::parse(a) {
                Some(a) => Some(a),
                None => continue, // HS256, none, RSA-OAEP...: never usable
            },
            None => None,
        };
        let material = match (
            jwk.get("kty").and_then(|k| k.as_str()),
            jwk.get("crv").and_then(|c| c.as_str()),
        ) {
            (Some("RSA"), _) => {
                let n = b64url(jwk, "n")?;
                let e = b64url(jwk, "e")?;
                let n = n.iter().skip_while(|b| **b == 0).copied().collect();
                Material::RsaComponents { n, e }
            }
            (Some("EC"), Some(crv @ ("P-256" | "P-384"))) => {
                let mut pt = vec![4u8];
                pt.extend(b64url(jwk, "x")?);
                pt.extend(b64url(jwk, "y")?);
                if crv == "P-256" {
                    Material::P256(pt)
                } else {
                    Material::P384(pt)
                }
            }
            (Some("OKP"), Some("Ed25519")) => Material::Ed25519(b64url(jwk, "x")?),
            _ => continue,
        };
        keys.push(Key {
            kid: jwk.get("kid").and_then(|k| k.as_str()).map(str::to_string),
            alg,
            material,
            source: source.clone(),
        });
    }
    if keys.is_empty() {
        return Err(KeyError::BadJwks("no usable signing key".into()));
    }
    Ok(keys)
}
