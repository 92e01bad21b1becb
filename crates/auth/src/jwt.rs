//! JWS compact tokens: parsing, signature check against the key set, claim checks.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

use super::keys::{Alg, Key};

/// Tokens longer than this are refused before any parsing.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// Why a token was refused; `label` is the metrics reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token too large")]
    TooLarge,
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    #[error("algorithm {0} is not allowed")]
    Algorithm(String),
    #[error("no key with id {0:?}")]
    UnknownKid(String),
    #[error("no key available for {0}")]
    NoKey(&'static str),
    #[error("invalid signature")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token has no exp claim")]
    MissingExp,
    #[error("token not valid yet")]
    NotYetValid,
    #[error("wrong issuer")]
    Issuer,
    #[error("wrong audience")]
    Audience,
    #[error("token has no {0} claim")]
    NoConsumer(String),
}

impl TokenError {
    pub fn label(&self) -> &'static str {
        match self {
            TokenError::TooLarge => "too_large",
            TokenError::Malformed(_) => "malformed",
            TokenError::Algorithm(_) => "algorithm",
            TokenError::UnknownKid(_) => "unknown_kid",
            TokenError::NoKey(_) => "no_key",
            TokenError::BadSignature => "bad_signature",
            TokenError::Expired => "expired",
            TokenError::MissingExp => "missing_exp",
            TokenError::NotYetValid => "not_yet_valid",
            TokenError::Issuer => "issuer",
            TokenError::Audience => "audience",
            TokenError::NoConsumer(_) => "no_consumer",
        }
    }
}

/// Claim rules from the config.
#[derive(Debug, Clone)]
pub struct Policy {
    pub algorithms: Vec<Alg>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway: Duration,
    pub require_exp: bool,
    pub consumer_claim: String,
}

/// A token that passed every check.
#[derive(Debug, Clone)]
pub struct Verified {
    pub consumer: String,
    /// Unix seconds; None when the token has no exp (only with requireExp: false).
    pub exp: Option<u64>,
    pub claims: serde_json::Map<String, serde_json::Value>,
}

/// The header fields a verifier needs, read before any key is touched.
pub struct Header {
    pub alg: String,
    pub kid: Option<String>,
}

pub struct Parts<'a> {
    pub header: Header,
    pub signing_input: &'a [u8],
    pub payload: Vec<u8>,
    pub signature: Vec<u8>,
}

/// Splits and decodes a compact JWS. Nothing is trusted yet.
pub fn split(token: &str) -> Result<Parts<'_>, TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::TooLarge);
    }
    let mut it = token.split('.');
    let (Some(h), Some(p), Some(s), None) = (it.next(), it.next(), it.next(), it.next()) else {
        return Err(TokenError::Malformed("expected three dot-separated parts"));
    };
    let dec = |x: &str| URL_SAFE_NO_PAD.decode(x);
    let header_json = dec(h).map_err(|_| TokenError::Malformed("header is not base64url"))?;
    let payload = dec(p).map_err(|_| TokenError::Malformed("payload is not base64url"))?;
    let signature = dec(s).map_err(|_| TokenError::Malformed("signature is not base64url"))?;
    let hv: serde_json::Value = serde_json::from_slice(&header_json)
        .map_err(|_| TokenError::Malformed("header is not JSON"))?;
    let alg = hv
        .get("alg")
        .and_then(|a| a.as_str())
        .ok_or(TokenError::Malformed("header has no alg"))?
        .to_string();
    if hv.get("crit").is_some() {
        return Err(TokenError::Malformed(
            "crit header parameters are not supported",
        ));
    }
    let kid = hv.get("kid").and_then(|k| k.as_str()).map(str::to_string);
    Ok(Parts {
        header: Header { alg, kid },
        signing_input: &token.as_bytes()[..h.len() + 1 + p.len()],
        payload,
        signature,
    })
}

/// Outcome of the signature step.
pub enum SigCheck {
    Ok,
    /// The token names a kid that is not in the key set (a JWKS refresh may help).
    UnknownKid(String),
    Failed(TokenError),
}

/// Checks the algorithm against the allow-list and the signature against the keys.
pub fn check_signature(parts: &Parts<'_>, policy: &Policy, keys: &[Key]) -> SigCheck {
    let Some(alg) = Alg::parse(&parts.header.alg).filter(|a| policy.algorithms.contains(a)) else {
        return SigCheck::Failed(TokenError::Algorithm(
            parts.header.alg.chars().take(16).collect(),
        ));
    };
    let candidates: Vec<&Key> = match &parts.header.kid {
        Some(kid) if keys.iter().any(|k| k.kid.is_some()) => {
            let found: Vec<&Key> = keys
                .iter()
                .filter(|k| k.kid.as_deref() == Some(kid))
                .collect();
            if found.is_empty() {
                // PEM keys carry no kid; they still apply to tokens that name one.
                let anonymous: Vec<&Key> = keys.iter().filter(|k| k.kid.is_none()).collect();
                if anonymous.is_empty() {
                    return SigCheck::UnknownKid(kid.chars().take(64).collect());
                }
                anonymous
            } else {
                found
            }
        }
        _ => keys.iter().collect(),
    };
    let fitting: Vec<&&Key> = candidates.iter().filter(|k| k.fits(alg)).collect();
    if fitting.is_empty() {
        return SigCheck::Failed(TokenError::NoKey(alg.name()));
    }
    if fitting
        .iter()
        .any(|k| k.verify(alg, parts.signing_input, &parts.signature))
    {
        SigCheck::Ok
    } else {
        SigCheck::Failed(TokenError::BadSignature)
    }
}

fn num(v: Option<&serde_json::Value>) -> Result<Option<u64>, TokenError> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Number(n)) => n
            .as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0)
            .map(|f| Some(f as u64))
            .ok_or(TokenError::Malformed(
                "time claim is not a non-negative number",
            )),
        Some(_) => Err(TokenError::Malformed("time claim is not a number")),
    }
}

/// Checks the claims of a signature-verified token at time `now` (Unix seconds).
pub fn check_claims(payload: &[u8], policy: &Policy, now: u64) -> Result<Verified, TokenError> {
    let v: serde_json::Value = serde_json::from_slice(payload)
        .map_err(|_| TokenError::Malformed("payload is not JSON"))?;
    let serde_json::Value::Object(claims) = v else {
        return Err(TokenError::Malformed("payload is not a JSON object"));
    };
    let leeway = policy.leeway.as_secs();
    let exp = num(claims.get("exp"))?;
    match exp {
        Some(exp) if now >= exp.saturating_add(leeway) => return Err(TokenError::Expired),
        None if policy.require_exp => return Err(TokenError::MissingExp),
        _ => {}
    }
    if let Some(nbf) = num(claims.get("nbf"))? {
        if now.saturating_add(leeway) < nbf {
            return Err(TokenError::NotYetValid);
        }
    }
    if let Some(iss) = &policy.issuer {
        if claims.get("iss").and_then(|v| v.as_str()) != Some(iss.as_str()) {
            return Err(TokenError::Issuer);
        }
    }
    if let Some(aud) = &policy.audience {
        let ok = match claims.get("aud") {
            Some(serde_json::Value::String(s)) => s == aud,
            Some(serde_json::Value::Array(a)) => a.iter().any(|x| x.as_str() == Some(aud.as_str())),
            _ => false,
        };
        if !ok {
            return Err(TokenError::Audience);
        }
    }
    let consumer = match claims.get(&policy.consumer_claim) {
        Some(serde_json::Value::String(s)) if !s.is_empty() && s.len() <= 256 => s.clone(),
        Some(serde_json::Value::Number(n)) => n.to_string(),
        _ => return Err(TokenError::NoConsumer(policy.consumer_claim.clone())),
    };
    if consumer.bytes().any(|b| b.is_ascii_control()) {
        return Err(TokenError::NoConsumer(policy.consumer_claim.clone()));
    }
    Ok(Verified {
        consumer,
        exp,
        claims,
    })
}
