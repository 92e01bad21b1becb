//! Step 4 of the pipeline: who the request is from, when its route requires a token.

use std::sync::Arc;

use http::{header, HeaderValue, Request};

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
                challenge
                    .map(|v| (header::WWW_AUTHENTICATE, v))
                    .into_iter()
                    .collect(),
            ))
        }
    }
}

/// The WWW-Authenticate challenge for a refused token: no error code when the request carried
/// no token at all.
fn challenge(e: &AuthError) -> Option<HeaderValue> {
    let challenge = match e {
        AuthError::Missing => "Bearer realm=\"hexgate\"".to_string(),
        other => format!(
            "Bearer realm=\"hexgate\", error=\"invalid_token\", error_description=\"{}\"",
            other.to_string().replace(['"', '\\'], "'")
        ),
    };
    HeaderValue::from_str(&challenge).ok()
}
