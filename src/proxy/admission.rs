//! Steps 2b and 5b of the pipeline: who may use the route at all (`ipAllow`, `ipDeny`: 403) and
//! load shedding (`maxInFlight`: 503 at once with Retry-After, lower plan priorities first).

use std::net::IpAddr;

use crate::error::Reject;
use crate::limits::PlanPolicy;
use crate::snapshot::ServiceRt;

/// `ipAllow` and `ipDeny`, parsed.
#[derive(Debug, Default)]
pub struct IpRules {
    pub allow: Vec<(IpAddr, u8)>,
    pub deny: Vec<(IpAddr, u8)>,
}

impl IpRules {
    /// None when the route lets every address in.
    pub fn build(p: &crate::config::Policies) -> Option<IpRules> {
        if p.ip_allow.is_empty() && p.ip_deny.is_empty() {
            return None;
        }
        let parse = |l: &[String]| {
            l.iter()
                .filter_map(|c| crate::config::parse_cidr(c))
                .collect()
        };
        Some(IpRules {
            allow: parse(&p.ip_allow),
            deny: parse(&p.ip_deny),
        })
    }
}

/// `maxInFlight` of one route in one instance.
#[derive(Debug)]
pub struct InFlight {
    pub max: u64,
}

impl InFlight {
    /// `plans`: their priorities set how much of `max` each may fill.
    pub fn build(
        max: u64,
        _plans: &std::collections::BTreeMap<String, crate::config::Plan>,
    ) -> InFlight {
        InFlight { max }
    }
}

/// Held while a request is in flight on its route.
pub struct InFlightGuard;

/// Step 2b: the client address against the route's IP rules.
pub fn check_ip(_svc: &ServiceRt, _ip: IpAddr) -> Result<(), Reject> {
    Ok(())
}

/// Step 5b: a place among the route's requests in flight, or 503 when it is full for this
/// request's plan priority.
pub fn enter(
    _svc: &ServiceRt,
    _plan: Option<&PlanPolicy>,
) -> Result<Option<InFlightGuard>, Reject> {
    Ok(None)
}
