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
    redis_failed: &mut Option<bool>,
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
    *redis_failed = verdict.redis_failed;
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
/// address in X-Forwarded-For that is not itself a trusted proxy. Entries may carry a port
/// (`203.0.113.7:443`, `[2001:db8::1]:443`, as some proxies append them); empty ones are skipped.
/// The flag is false when a trusted proxy named a client that is not an address (`unknown`, a
/// zone id, garbage): the client is then unknown, the address returned is the last trusted
/// proxy's (rate limits count it there), and IP rules refuse the request rather than judge the
/// proxy.
pub fn client_ip(snap: &Snapshot, peer: IpAddr, headers: &HeaderMap) -> (IpAddr, bool) {
    if !snap.is_trusted_proxy(peer) {
        return (peer, true);
    }
    let mut ip = peer;
    let mut values = headers.get_all("x-forwarded-for").iter().rev();
    for v in values.by_ref() {
        let Ok(v) = v.to_str() else {
            return (ip, false);
        };
        for hop in v.rsplit(',').map(str::trim).filter(|h| !h.is_empty()) {
            match forwarded_addr(hop) {
                Some(addr) => {
                    ip = addr;
                    if !snap.is_trusted_proxy(addr) {
                        return (ip, true);
                    }
                }
                None => return (ip, false),
            }
        }
    }
    (ip, true)
}

/// An X-Forwarded-For entry's address: `ip`, `ip:port`, `[v6]` or `[v6]:port`.
fn forwarded_addr(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sa) = hop.parse::<std::net::SocketAddr>() {
        return Some(sa.ip());
    }
    hop.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .and_then(|h| h.parse::<std::net::Ipv6Addr>().ok())
        .map(IpAddr::V6)
}

#[cfg(test)]
mod tests {
    use super::forwarded_addr;

    #[test]
    fn forwarded_entries_with_ports_and_brackets() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert_eq!(forwarded_addr("203.0.113.7"), Some(ip("203.0.113.7")));
        assert_eq!(forwarded_addr("203.0.113.7:443"), Some(ip("203.0.113.7")));
        assert_eq!(forwarded_addr("2001:db8::1"), Some(ip("2001:db8::1")));
        assert_eq!(forwarded_addr("[2001:db8::1]:443"), Some(ip("2001:db8::1")));
        assert_eq!(forwarded_addr("[2001:db8::1]"), Some(ip("2001:db8::1")));
        for bad in [
            "unknown",
            "fe80::1%eth0",
            "1.2.3.4:",
            "[1.2.3.4]",
            "1.2.3.4:99999",
            "_hidden",
        ] {
            assert_eq!(forwarded_addr(bad), None, "{bad}");
        }
    }
}
