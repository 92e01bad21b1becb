//! Step 6 of the pipeline (and the plan, step 5): the route's rate limit and quota, counted by
//! client address, consumer or header, and the consumer's plan's.

use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, Request};

use crate::auth::Identity;
use crate::error::{GatewayError, Reject};
use crate::limits::PlanPolicy;
use crate::snapshot::{ServiceRt, Snapshot};
use crate::state::State;

/// The consumer's plan on a route that applies plans: its credential's, else the default.
/// 403 when the plan is unknown, or there is none and no default (counted as an auth failure).
pub fn plan_of<'s>(
    snap: &'s Snapshot,
    svc: &ServiceRt,
    identity: Option<&Identity>,
) -> Result<Option<&'s Arc<PlanPolicy>>, Reject> {
    match (&snap.plans, identity) {
        (Some(plans), Some(id)) if svc.plans => match plans.resolve(id.plan.as_deref()) {
            Ok(p) => Ok(Some(p)),
            Err(e) => {
                svc.metrics.auth_failure(e.label());
                Err(GatewayError::PlanRefused(e).into())
            }
        },
        _ => Ok(None),
    }
}

/// Charges the request to the route's limits and its consumer's plan's. Allowed: the RateLimit
/// fields for the response. Refused: 429 with those fields and Retry-After; 503 when the store
/// is unavailable and the failure mode is closed.
pub async fn check<B>(
    state: &State,
    svc: &ServiceRt,
    ip: IpAddr,
    plan: Option<&PlanPolicy>,
    identity: Option<&Identity>,
    req: &Request<B>,
) -> Result<Vec<(HeaderName, HeaderValue)>, Reject> {
    let route = svc.limits.as_ref();
    if route.is_none() && plan.is_none_or(|p| p.rate.is_none() && p.quota.is_none()) {
        return Ok(Vec::new());
    }
    // Boxed, so a route without limits does not carry the limiter's state in its future.
    let verdict = Box::pin(state.limiter.check(
        route,
        plan,
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
