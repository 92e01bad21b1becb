//! Steps 4 and 5 of the pipeline: who the request is from, when its route requires a
//! credential (a JWT, an API key), and whether that credential grants the route's scopes.

use std::sync::Arc;

use http::{header, HeaderValue, Request};

use crate::auth::apikeys::ApiKeyError;
use crate::auth::jwt::TokenError;
use crate::auth::{AuthError, Identity};
use crate::error::{GatewayError, Reject};
use crate::snapshot::{ServiceRt, Snapshot};

/// How a request was authenticated (its span's attributes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum How {
    None,
    ApiKey,
    /// A JWT; `cached` when the verified-token cache knew it (no signature check).
    Jwt {
        cached: bool,
    },
}

impl How {
    pub fn method(self) -> &'static str {
        match self {
            How::None => "none",
            How::ApiKey => "api_key",
            How::Jwt { .. } => "jwt",
        }
    }

    /// `hit` or `miss` for a JWT.
    pub fn cached(self) -> Option<&'static str> {
        match self {
            How::Jwt { cached: true } => Some("hit"),
            How::Jwt { cached: false } => Some("miss"),
            _ => None,
        }
    }
}

/// The consumer identity when the route requires a credential; a refusal carries the challenge
/// (RFC 6750 section 3). An API key is used when the route accepts keys and the request carries
/// one; otherwise the route's JWT check applies.
pub async fn authenticate<B>(
    snap: &Snapshot,
    svc: &ServiceRt,
    req: &Request<B>,
    how: &mut How,
) -> Result<Option<Arc<Identity>>, Reject> {
    if !svc.auth {
        return Ok(None);
    }
    let keys = snap.api_keys.as_ref().filter(|_| svc.accepts_api_key);
    if let Some(k) = keys {
        let mut values = req.headers().get_all(&k.header).iter();
        if let Some(value) = values.next() {
            *how = How::ApiKey;
            let now = hexgate_http::clock::Clock::System.now_secs();
            // Two keys in one request are refused, not chosen between.
            let checked = if values.next().is_some() {
                Err(crate::auth::apikeys::ApiKeyError::Malformed)
            } else {
                k.store.check(value, now)
            };
            return match checked {
                Ok(identity) => Ok(Some(identity)),
                Err(e) => {
                    svc.metrics.auth_failure(e.label());
                    Err(refusal(AuthError::ApiKey(e), svc))
                }
            };
        }
        if !svc.accepts_jwt {
            svc.metrics.auth_failure("apikey_missing");
            return Err(refusal(AuthError::MissingApiKey(k.header.to_string()), svc));
        }
    }
    let Some(auth) = &snap.auth else {
        return Err(GatewayError::Internal("authentication not configured".into()).into());
    };
    let mut cached = false;
    let result = auth.authenticate_noting(req.headers(), &mut cached).await;
    *how = How::Jwt { cached };
    match result {
        Ok(identity) => Ok(Some(identity)),
        Err(e) => {
            svc.metrics.auth_failure(e.label());
            Err(refusal(e, svc))
        }
    }
}

/// A 401 with its challenge: `Bearer` on routes that take tokens, `ApiKey` on key-only routes.
fn refusal(e: AuthError, svc: &ServiceRt) -> Reject {
    let challenge = if svc.accepts_jwt {
        challenge(&e)
    } else {
        HeaderValue::from_static("ApiKey realm=\"hexgate\"")
    };
    Reject::new(
        GatewayError::Unauthorized(e),
        vec![(header::WWW_AUTHENTICATE, challenge)],
    )
}

/// Step 5: every scope the route requires must be granted, else 403 with the RFC 6750
/// `insufficient_scope` challenge naming them.
pub fn authorize(svc: &ServiceRt, identity: Option<&Identity>) -> Result<(), Reject> {
    if svc.require_scopes.is_empty() {
        return Ok(());
    }
    let missing = match identity {
        Some(id) => id.missing_scopes(&svc.require_scopes),
        None => svc.require_scopes.iter().map(String::as_str).collect(),
    };
    if missing.is_empty() {
        return Ok(());
    }
    svc.metrics.auth_failure("insufficient_scope");
    // Scopes were checked at load to be visible ASCII without quotes or backslashes.
    let value = format!(
        "Bearer realm=\"hexgate\", error=\"insufficient_scope\", scope=\"{}\"",
        svc.require_scopes.join(" ")
    );
    let challenge = HeaderValue::from_str(&value).unwrap_or(HeaderValue::from_static(
        "Bearer error=\"insufficient_scope\"",
    ));
    Err(Reject::new(
        GatewayError::Forbidden(format!("missing scope: {}", missing.join(" "))),
        vec![(header::WWW_AUTHENTICATE, challenge)],
    ))
}

/// The WWW-Authenticate challenge for a refused token (RFC 6750 section 3): no error code when
/// the request carried no token at all; otherwise a fixed description per kind of failure, never
/// text taken from the token (an `alg` or `kid` would be reflected, and one with a control
/// character would make the header invalid and drop the challenge).
fn challenge(e: &AuthError) -> HeaderValue {
    let description = match e {
        AuthError::Missing => return HeaderValue::from_static("Bearer realm=\"hexgate\""),
        AuthError::BadHeader => "the Authorization header is not a Bearer token",
        AuthError::MissingApiKey(_) => return HeaderValue::from_static("Bearer realm=\"hexgate\""),
        AuthError::ApiKey(k) => match k {
            ApiKeyError::Malformed => "malformed API key",
            ApiKeyError::Unknown => "unknown API key",
            ApiKeyError::Expired => "API key expired",
        },
        AuthError::Token(t) => match t {
            TokenError::TooLarge => "token too large",
            TokenError::Malformed(_) => "malformed token",
            TokenError::Algorithm(_) => "algorithm not allowed",
            TokenError::UnknownKid(_) => "unknown key id",
            TokenError::NoKey(_) => "no key for the token's algorithm",
            TokenError::BadSignature => "invalid signature",
            TokenError::Expired => "token expired",
            TokenError::MissingExp => "token has no exp claim",
            TokenError::NotYetValid => "token not valid yet",
            TokenError::Issuer => "wrong issuer",
            TokenError::Audience => "wrong audience",
            TokenError::NoConsumer(_) => "token has no consumer claim",
        },
    };
    let value = format!(
        "Bearer realm=\"hexgate\", error=\"invalid_token\", error_description=\"{description}\""
    );
    HeaderValue::from_str(&value).unwrap_or(HeaderValue::from_static("Bearer realm=\"hexgate\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_never_carry_token_text() {
        let hostile = AuthError::Token(TokenError::Algorithm("\u{1}<script>\"".into()));
        let c = challenge(&hostile);
        let c = c.to_str().expect("a visible-ASCII header");
        assert!(c.contains("error=\"invalid_token\""), "{c}");
        assert!(c.contains("algorithm not allowed"), "{c}");
        assert!(!c.contains('<'), "{c}");
        assert_eq!(
            challenge(&AuthError::Missing).to_str().ok(),
            Some("Bearer realm=\"hexgate\"")
        );
    }
}
