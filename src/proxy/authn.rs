//! Step 4 of the pipeline: who the request is from, when its route requires a token.

use std::sync::Arc;

use http::{header, HeaderValue, Request};

use crate::auth::jwt::TokenError;
use crate::auth::{AuthError, Identity};
use crate::error::{GatewayError, Reject};
use crate::snapshot::{ServiceRt, Snapshot};

/// The consumer identity when the route requires a token; a refusal carries the Bearer
/// challenge (RFC 6750 section 3).
pub async fn authenticate<B>(
    snap: &Snapshot,
    svc: &ServiceRt,
    req: &Request<B>,
) -> Result<Option<Arc<Identity>>, Reject> {
    if !svc.auth {
        return Ok(None);
    }
    let Some(auth) = &snap.auth else {
        return Err(GatewayError::Internal("authentication not configured".into()).into());
    };
    match auth.authenticate(req.headers()).await {
        Ok(identity) => Ok(Some(identity)),
        Err(e) => {
            svc.metrics.auth_failure(e.label());
            let challenge = challenge(&e);
            Err(Reject::new(
                GatewayError::Unauthorized(e),
                vec![(header::WWW_AUTHENTICATE, challenge)],
            ))
        }
    }
}

/// The WWW-Authenticate challenge for a refused token (RFC 6750 section 3): no error code when
/// the request carried no token at all; otherwise a fixed description per kind of failure, never
/// text taken from the token (an `alg` or `kid` would be reflected, and one with a control
/// character would make the header invalid and drop the challenge).
fn challenge(e: &AuthError) -> HeaderValue {
    let description = match e {
        AuthError::Missing => return HeaderValue::from_static("Bearer realm=\"hexgate\""),
        AuthError::BadHeader => "the Authorization header is not a Bearer token",
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
