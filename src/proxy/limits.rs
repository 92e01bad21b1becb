//! Step 6 of the pipeline: the route's rate limit and quota, counted by client address,
//! consumer or header.

use std::net::IpAddr;

use http::{HeaderMap, HeaderName, HeaderValue, Request};

use super::ConnInfo;
use crate::auth::Identity;
use crate::error::{GatewayError, Reject};
use crate::snapshot::{ServiceRt, Snapshot};
use crate::state::State;

/// Charges the request to the route's limits and its consumer's plan. Allowed: the RateLimit
/// fields for the response. Refused: 429 with those fields and Retry-After; 403 when the
/// consumer's plan is unknown or it has none (and there is no default plan); 503 when the store
/// is unavailable and the failure mode is closed.
pub async fn check<B>(
    state: &State,
    snap: &Snapshot,
    svc: &ServiceRt,
    conn: ConnInfo,
    identity: Option<&Identity>,
    req: &Request<B>,
) -> Result<Vec<(HeaderName, HeaderValue)>, Reject> {
    let plan = match (&snap.plans, identity) {
        (Some(plans), Some(id)) if svc.plans => match plans.resolve(id.plan.as_deref()) {
            Ok(p) => Some(p),
            Err(e) => {
                svc.metrics.auth_failure(e.label());
                return Err(GatewayError::PlanRefused(e).into());
            }
        },
        _ => None,
    };
    let route = svc.limits.as_ref();
    if route.is_none() && plan.is_none_or(|p| p.rate.is_none() && p.quota.is_none()) {
        return Ok(Vec::new());
    }
    let ip = client_ip(snap, conn.peer.ip(), req.headers());
    // Boxed, so a route without limits does not carry the limiter's state in its future.
    let verdict = Box::pin(state.limiter.check(
        route,
        plan.map(|p| &**p),
        &svc.metrics,
        ip,
        identity.map(|i| &*i.consumer),
        req.headers(),
    ))
    .await;
    if verdict.unavailable {
        return Err(GatewayError::LimitsUnavailable.into());
    }
    match verdict.retry_after {
        None => Ok(verdict.headers),
        Some(secs) => {
            let mut headers = verdict.headers;
            headers.push((http::header::RETRY_AFTER, HeaderValue::from(secs)));
            Err(Reject::new(GatewayError::TooManyRequests, headers))
        }
    }
}

/// The client's address: the peer, or, when the peer is a trusted proxy, the right-most
/// address in X-Forwarded-For that is not itself a trusted proxy.
pub fn client_ip(snap: &Snapshot, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
    if !snap.is_trusted_proxy(peer) {
        return peer;
    }
    let mut ip = peer;
    let hops = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect::<Vec<_>>();
    for hop in hops.iter().rev() {
        match hop.parse::<IpAddr>() {
            Ok(addr) => {
                ip = addr;
                if !snap.is_trusted_proxy(addr) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    ip
}
