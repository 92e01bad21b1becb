//! Steps 2b and 5b of the pipeline: who may use the route at all (`ipAllow`, `ipDeny`: 403) and
//! load shedding (`maxInFlight`: 503 at once with Retry-After, lower plan priorities first).
//!
//! **IP rules.** Every address is placed in one 128-bit space: an IPv6 address as itself, an
//! IPv4 address as its IPv4-mapped form (`::ffff:a.b.c.d`), so a client the listener accepted on
//! a dual-stack socket (`::ffff:10.0.0.1`) is the IPv4 client it is. Each CIDR becomes a range of
//! that space; a list is kept as sorted, merged ranges, and a check is one binary search over
//! them (a handful of integer comparisons for the lists people write). An IPv6 CIDR shorter than
//! /96 that covers the mapped block (`::/0`, `::/8`) does not cover IPv4 clients: write
//! `0.0.0.0/0` for those (nginx, too, checks an IPv4-mapped client against its IPv4 rules). An
//! IPv4-mapped CIDR (`::ffff:10.0.0.0/104`) is the IPv4 CIDR it spells (`10.0.0.0/8`).
//!
//! **Load shedding.** A route's requests in flight (from admission until the backend's response
//! head) are counted in one atomic per route and instance; a request is admitted only while the
//! count is below its limit, with one compare-and-swap (no lock, no queue), and the guard gives
//! the place back when dropped: at the response head, on a refusal further down, on a panic, or
//! when the client goes away and the request's future is dropped.
//!
//! **Plan priority** is trunk reservation (the "guard channels" of telephone networks; Envoy's
//! priority load-shed points are the same idea over a resource gauge): each priority below the
//! top leaves some places free for the priorities above it. With `k` distinct priorities among
//! the configured plans, ranked 0 (lowest) to k−1, a request of rank `r` is admitted only while
//! in flight < `max − step·(k−1−r)`, where `step = max(1, min(max/10, max/(2·(k−1))))`:
//! - the top priority can always fill the whole `maxInFlight`;
//! - each level below it leaves 10 % more of it to the levels above, and never less than one
//!   place, so a burst of a lower plan can never take the places kept for a higher one (while
//!   `maxInFlight` is at least the number of levels; below that the lowest levels share one);
//! - every level keeps at least one place, and the reservations together never take more than
//!   half of `maxInFlight` (with more than six levels the step shrinks) as long as there is a
//!   place for each (`maxInFlight` ≥ 2·(k−1)), so the lowest plan keeps at least half;
//! - with one plan, no plans, or on a route that does not apply plans, every request may use the
//!   whole `maxInFlight`.
//!
//! A lower plan is refused first, but the places it leaves free are not idle: a higher plan may
//! use any place below its own limit, the lower plans' included. Unlike fixed partitions
//! (Kubernetes' priority levels, Netflix's partitioned limiter) nothing has to be sized by hand,
//! and unlike strict priority nothing has to be preempted: a request once admitted runs to its
//! end. Requests without a plan on a route that applies plans count as the lowest rank.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use http::{header, HeaderValue};

use crate::error::{GatewayError, Reject};
use crate::limits::PlanPolicy;

/// The start of the IPv4-mapped block `::ffff:0:0/96`.
const MAPPED: u128 = 0xffff_0000_0000;
/// Its last address, `::ffff:255.255.255.255`.
const MAPPED_END: u128 = MAPPED | 0xffff_ffff;

/// An address in the one space both families share: IPv4 as its IPv4-mapped IPv6 form.
fn key(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => MAPPED | u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// The ranges of the shared space a CIDR covers (one, or two for an IPv6 CIDR around the
/// IPv4-mapped block: IPv4 clients are not IPv6 ones).
fn cidr_ranges(net: IpAddr, len: u8) -> impl Iterator<Item = (u128, u128)> {
    let bits = match net {
        IpAddr::V4(_) => 96 + u32::from(len.min(32)),
        IpAddr::V6(_) => u32::from(len.min(128)),
    };
    // The host part: the low 128 − bits bits.
    let host = u128::MAX.checked_shr(bits).unwrap_or(0);
    let start = key(net) & !host;
    let end = start | host;
    if bits >= 96 || end < MAPPED || MAPPED_END < start {
        return [Some((start, end)), None].into_iter().flatten();
    }
    // An IPv6 CIDR shorter than /96 that holds the mapped block: all of it but that block.
    let below = (start < MAPPED).then_some((start, MAPPED - 1));
    let above = (MAPPED_END < end).then_some((MAPPED_END + 1, end));
    [below, above].into_iter().flatten()
}

/// A set of addresses: sorted, disjoint, non-adjacent inclusive ranges of the shared space.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Ranges(Vec<(u128, u128)>);

impl Ranges {
    fn of(cidrs: &[(IpAddr, u8)]) -> Ranges {
        let mut all: Vec<(u128, u128)> = cidrs
            .iter()
            .flat_map(|&(net, len)| cidr_ranges(net, len))
            .collect();
        all.sort_unstable();
        let mut merged: Vec<(u128, u128)> = Vec::with_capacity(all.len());
        for (s, e) in all {
            match merged.last_mut() {
                Some(last) if s <= last.1.saturating_add(1) => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        Ranges(merged)
    }

    fn contains(&self, k: u128) -> bool {
        let i = self.0.partition_point(|r| r.0 <= k);
        i > 0 && self.0[i - 1].1 >= k
    }
}

/// `ipAllow` and `ipDeny`, compiled.
#[derive(Debug, Default)]
pub struct IpRules {
    allow: Ranges,
    /// `ipAllow` is not empty: an address it does not list is refused.
    allow_listed: bool,
    deny: Ranges,
}

impl IpRules {
    /// None when the route lets every address in.
    pub fn build(p: &crate::config::Policies) -> Option<IpRules> {
        if p.ip_allow.is_empty() && p.ip_deny.is_empty() {
            return None;
        }
        let parse = |l: &[String]| -> Vec<(IpAddr, u8)> {
            l.iter()
                .filter_map(|c| crate::config::parse_cidr(c))
                .collect()
        };
        Some(IpRules::of(&parse(&p.ip_allow), &parse(&p.ip_deny)))
    }

    fn of(allow: &[(IpAddr, u8)], deny: &[(IpAddr, u8)]) -> IpRules {
        IpRules {
            allow: Ranges::of(allow),
            allow_listed: !allow.is_empty(),
            deny: Ranges::of(deny),
        }
    }

    /// `ipDeny` first (any match refuses), then `ipAllow` (when it lists anything, the address
    /// must be in it).
    pub fn admits(&self, ip: IpAddr) -> bool {
        let k = key(ip);
        !self.deny.contains(k) && (!self.allow_listed || self.allow.contains(k))
    }
}

/// `maxInFlight` of one route in one instance.
pub struct InFlight {
    pub max: u64,
    /// The route's metrics, which hold the in-flight count: it outlives this snapshot, so a
    /// reload does not let a second `maxInFlight` of requests in beside the first.
    metrics: std::sync::Arc<crate::metrics::ServiceMetrics>,
    /// The distinct priorities of the configured plans, ascending: a plan's rank is its index.
    priorities: Vec<u32>,
    /// `limits[rank]`: a request of that rank is admitted while in flight is below it.
    limits: Vec<u64>,
    /// Refusals by plan name, sorted by name; `None` for requests without a plan.
    shed: Vec<(Option<String>, AtomicU64)>,
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InFlight")
            .field("max", &self.max)
            .field("in_flight", &self.in_flight())
            .field("limits", &self.limits)
            .finish()
    }
}

impl InFlight {
    /// `plans`: their priorities set how much of `max` each may fill.
    pub fn build(
        max: u64,
        plans: &std::collections::BTreeMap<String, crate::config::Plan>,
        metrics: std::sync::Arc<crate::metrics::ServiceMetrics>,
    ) -> InFlight {
        let mut priorities: Vec<u32> = plans.values().map(|p| p.priority).collect();
        priorities.sort_unstable();
        priorities.dedup();
        let limits = rank_limits(max, priorities.len());
        let shed = std::iter::once(None)
            .chain(plans.keys().map(|n| Some(n.clone())))
            .map(|n| (n, AtomicU64::new(0)))
            .collect();
        InFlight {
            max,
            metrics,
            priorities,
            limits,
            shed,
        }
    }

    /// How many places a request may fill: its plan's limit on a route that applies plans,
    /// the whole `maxInFlight` elsewhere.
    fn limit(&self, plans_apply: bool, plan: Option<&PlanPolicy>) -> u64 {
        if !plans_apply || self.limits.is_empty() {
            return self.max;
        }
        let rank = match plan {
            // A priority no configured plan has cannot come from this snapshot; it takes the
            // rank of the highest configured priority below it.
            Some(p) => match self.priorities.binary_search(&p.priority) {
                Ok(r) => r,
                Err(r) => r.saturating_sub(1),
            },
            None => 0,
        };
        self.limits[rank]
    }

    /// Takes a place if fewer than `limit` are taken.
    fn try_enter(&self, limit: u64) -> Option<InFlightGuard<'_>> {
        let count = &self.metrics.in_flight.0;
        let mut now = count.load(Ordering::Relaxed);
        loop {
            if now >= limit {
                return None;
            }
            match count.compare_exchange_weak(now, now + 1, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Some(InFlightGuard(count)),
                Err(seen) => now = seen,
            }
        }
    }

    fn count_shed(&self, plan: Option<&str>) {
        if let Ok(i) = self
            .shed
            .binary_search_by(|(name, _)| name.as_deref().cmp(&plan))
        {
            self.shed[i].1.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> u64 {
        self.metrics.in_flight.0.load(Ordering::Relaxed)
    }

    /// Requests refused so far, by plan (`None`: requests without a plan), for
    /// `hexgate_load_shed_total{service,plan}`.
    pub fn shed(&self) -> impl Iterator<Item = (Option<&str>, u64)> {
        self.shed
            .iter()
            .map(|(n, c)| (n.as_deref(), c.load(Ordering::Relaxed)))
    }

    /// The limit of each rank, lowest first (for tests and `/admin` views).
    pub fn limits(&self) -> &[u64] {
        &self.limits
    }
}

/// The limit of each of `k` ranks under `maxInFlight` = `max` (see the module's comment).
fn rank_limits(max: u64, k: usize) -> Vec<u64> {
    if k <= 1 {
        return vec![max; k];
    }
    let levels = k as u64 - 1;
    let step = (max / 10).min(max / (2 * levels)).max(1);
    (0..k as u64)
        .map(|r| {
            max.saturating_sub(step.saturating_mul(levels - r))
                .max(1)
                .min(max)
        })
        .collect()
}

/// Held while a request is in flight on its route: gives its place back when dropped.
#[derive(Debug)]
pub struct InFlightGuard<'a>(&'a AtomicU64);

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Step 2b: the client address against the route's IP rules. A client a trusted proxy named
/// unreadably (`known` false) is refused by any rule: judging the proxy's address instead would
/// let every client behind it through an `ipAllow` covering the proxy.
pub fn check_ip(
    rules: Option<&IpRules>,
    metrics: &crate::metrics::ServiceMetrics,
    ip: IpAddr,
    known: bool,
) -> Result<(), Reject> {
    match rules {
        Some(rules) if !known || !rules.admits(ip) => {
            metrics.auth_failure("ip_denied");
            Err(GatewayError::IpDenied.into())
        }
        _ => Ok(()),
    }
}

/// Step 5b: a place among the route's requests in flight (`maxInFlight`, when the route sets
/// it), or 503 when it is full for this request's plan priority (`plans_apply`: the route
/// applies plans).
pub fn enter<'s>(
    in_flight: Option<&'s InFlight>,
    plans_apply: bool,
    plan: Option<&PlanPolicy>,
) -> Result<Option<InFlightGuard<'s>>, Reject> {
    let Some(inf) = in_flight else {
        return Ok(None);
    };
    match inf.try_enter(inf.limit(plans_apply, plan)) {
        Some(guard) => Ok(Some(guard)),
        None => {
            inf.count_shed(plan.map(|p| &*p.name));
            Err(Reject::new(
                GatewayError::Overloaded,
                vec![(header::RETRY_AFTER, HeaderValue::from_static("1"))],
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn test_metrics() -> std::sync::Arc<crate::metrics::ServiceMetrics> {
        crate::metrics::Registry::default().service("t")
    }

    fn cidr(s: &str) -> (IpAddr, u8) {
        crate::config::parse_cidr(s).unwrap_or_else(|| panic!("{s}"))
    }

    fn rules(allow: &[&str], deny: &[&str]) -> IpRules {
        let l = |v: &[&str]| v.iter().map(|c| cidr(c)).collect::<Vec<_>>();
        IpRules::of(&l(allow), &l(deny))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn deny_comes_before_allow() {
        let r = rules(&["10.0.0.0/8"], &["10.1.0.0/16"]);
        assert!(r.admits(ip("10.2.3.4")));
        assert!(!r.admits(ip("10.1.3.4")));
        assert!(!r.admits(ip("11.0.0.1")));
        // A deny list alone lets everything else in.
        let r = rules(&[], &["127.0.0.1/32"]);
        assert!(!r.admits(ip("127.0.0.1")));
        assert!(r.admits(ip("127.0.0.2")));
        assert!(r.admits(ip("::1")));
    }

    #[test]
    fn ipv4_mapped_clients_are_ipv4_clients() {
        let r = rules(&["10.0.0.0/8"], &["10.9.9.9"]);
        assert!(r.admits(ip("::ffff:10.0.0.1")));
        assert!(!r.admits(ip("::ffff:10.9.9.9")));
        assert!(!r.admits(ip("::ffff:11.0.0.1")));
        // A mapped CIDR is the IPv4 CIDR it spells.
        let r = rules(&["::ffff:10.0.0.0/104"], &[]);
        assert!(r.admits(ip("10.1.2.3")));
        assert!(!r.admits(ip("11.1.2.3")));
        // `::/0` is every IPv6 client, not the IPv4 ones; `0.0.0.0/0` every IPv4 one.
        let r = rules(&["::/0"], &[]);
        assert!(r.admits(ip("2001:db8::1")));
        assert!(r.admits(ip("::1")));
        assert!(!r.admits(ip("10.0.0.1")));
        assert!(!r.admits(ip("::ffff:10.0.0.1")));
        let r = rules(&["0.0.0.0/0"], &[]);
        assert!(r.admits(ip("::ffff:1.2.3.4")));
        assert!(!r.admits(ip("2001:db8::1")));
    }

    #[test]
    fn prefix_edges() {
        let r = rules(&["192.168.1.7/32"], &[]);
        assert!(r.admits(ip("192.168.1.7")));
        assert!(!r.admits(ip("192.168.1.6")));
        assert!(!r.admits(ip("192.168.1.8")));
        let r = rules(&["2001:db8::7/128"], &[]);
        assert!(r.admits(ip("2001:db8::7")));
        assert!(!r.admits(ip("2001:db8::6")));
        // Odd lengths: 10.0.0.0/7 is 10.0.0.0 - 11.255.255.255.
        let r = rules(&["10.0.0.0/7"], &[]);
        assert!(r.admits(ip("11.255.255.255")));
        assert!(!r.admits(ip("9.255.255.255")));
        assert!(!r.admits(ip("12.0.0.0")));
        // Host bits in the network address are ignored, as by every CIDR matcher.
        let r = rules(&["10.1.2.3/9"], &[]);
        assert!(r.admits(ip("10.127.0.1")));
        assert!(!r.admits(ip("10.128.0.1")));
        let r = rules(&["2001:db8:8000::/33"], &[]);
        assert!(r.admits(ip("2001:db8:ffff::1")));
        assert!(!r.admits(ip("2001:db8:7fff::1")));
        // The ends of the space.
        let r = rules(&[], &["::/0", "0.0.0.0/0"]);
        assert!(!r.admits(ip("::")));
        assert!(!r.admits(ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")));
        assert!(!r.admits(ip("0.0.0.0")));
        assert!(!r.admits(ip("255.255.255.255")));
        let r = rules(
            &[
                "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128",
                "255.255.255.255",
            ],
            &[],
        );
        assert!(r.admits(ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")));
        assert!(r.admits(ip("255.255.255.255")));
        assert!(!r.admits(ip("255.255.255.254")));
    }

    #[test]
    fn overlapping_and_adjacent_cidrs_merge() {
        let r = Ranges::of(&[
            cidr("10.0.0.0/9"),
            cidr("10.128.0.0/9"),
            cidr("10.1.0.0/16"),
            cidr("1.2.3.4"),
        ]);
        assert_eq!(r.0.len(), 2, "{r:?}");
        let r = Ranges::of(&[cidr("::/0")]);
        assert_eq!(r.0, vec![(0, MAPPED - 1), (MAPPED_END + 1, u128::MAX)]);
    }

    /// The reference: bit by bit over the octets, each family on its own, a mapped client an
    /// IPv4 one, a mapped CIDR an IPv4 one.
    fn reference(net: IpAddr, len: u8, client: IpAddr) -> bool {
        fn unmap(ip: IpAddr, len: u8) -> (IpAddr, u8) {
            match ip {
                IpAddr::V6(a) => match a.to_ipv4_mapped() {
                    Some(v4) if len >= 96 => (IpAddr::V4(v4), len - 96),
                    _ => (ip, len),
                },
                v4 => (v4, len),
            }
        }
        let (net, len) = unmap(net, len);
        let (client, _) = unmap(client, 128);
        let bytes = |ip: IpAddr| match ip {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        };
        let (n, c) = (bytes(net), bytes(client));
        if n.len() != c.len() {
            return false;
        }
        (0..usize::from(len))
            .all(|i| (n[i / 8] >> (7 - i % 8)) & 1 == (c[i / 8] >> (7 - i % 8)) & 1)
    }

    /// A random address, often near `near` (sharing a random number of leading bits with it).
    fn random_ip(rng: &mut fastrand::Rng, near: Option<IpAddr>) -> IpAddr {
        let fresh = |rng: &mut fastrand::Rng| -> IpAddr {
            match rng.u8(0..4) {
                0 => IpAddr::V4(Ipv4Addr::from(rng.u32(..))),
                1 => IpAddr::V6(Ipv4Addr::from(rng.u32(..)).to_ipv6_mapped()),
                _ => IpAddr::V6(Ipv6Addr::from(rng.u128(..))),
            }
        };
        let Some(near) = near.filter(|_| rng.bool()) else {
            return fresh(rng);
        };
        let flip = |bits: u32, rng: &mut fastrand::Rng| -> u128 {
            // Flip one bit at a random position (or none), and randomise what is after it.
            let at = rng.u32(0..=bits);
            if at == bits {
                return 0;
            }
            let below = (1u128 << (bits - 1 - at)) - 1;
            (1u128 << (bits - 1 - at)) | (rng.u128(..) & below)
        };
        match near {
            IpAddr::V4(a) => {
                let v = u32::from(a) ^ flip(32, rng) as u32;
                let v4 = Ipv4Addr::from(v);
                if rng.bool() {
                    IpAddr::V4(v4)
                } else {
                    IpAddr::V6(v4.to_ipv6_mapped())
                }
            }
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) ^ flip(128, rng))),
        }
    }

    #[test]
    fn matching_agrees_with_a_bitwise_reference() {
        let mut rng = fastrand::Rng::with_seed(0x1dea_5eed);
        let (mut admitted, mut refused) = (0u32, 0u32);
        for round in 0..3000 {
            let n = rng.usize(0..5);
            let mut allow = Vec::new();
            let mut deny = Vec::new();
            for _ in 0..n {
                let net = random_ip(&mut rng, None);
                let max = if net.is_ipv4() { 32 } else { 128 };
                // Short, long and the edges all come up often.
                let len = match rng.u8(0..4) {
                    0 => [0, max, max - 1, 1, 96, 95, 97][rng.usize(0..7)].min(max),
                    _ => rng.u8(0..=max),
                };
                if rng.bool() {
                    allow.push((net, len));
                } else {
                    deny.push((net, len));
                }
            }
            let r = IpRules::of(&allow, &deny);
            let all: Vec<_> = allow.iter().chain(&deny).map(|c| c.0).collect();
            for _ in 0..40 {
                let near = (!all.is_empty()).then(|| all[rng.usize(..all.len())]);
                let client = random_ip(&mut rng, near);
                let denied = deny.iter().any(|&(n, l)| reference(n, l, client));
                let allowed =
                    allow.is_empty() || allow.iter().any(|&(n, l)| reference(n, l, client));
                if !denied && allowed {
                    admitted += 1;
                } else {
                    refused += 1;
                }
                assert_eq!(
                    r.admits(client),
                    !denied && allowed,
                    "round {round}: {client} against allow {allow:?} deny {deny:?}"
                );
            }
        }
        // Both answers come up often, so the comparison means something.
        let total = f64::from(admitted + refused);
        assert!(
            f64::from(admitted) / total > 0.2,
            "{admitted} admitted of {total}"
        );
        assert!(
            f64::from(refused) / total > 0.2,
            "{refused} refused of {total}"
        );
    }

    fn plans(
        priorities: &[(&str, u32)],
    ) -> std::collections::BTreeMap<String, crate::config::Plan> {
        let mut yaml = String::from("plans:\n");
        for (name, p) in priorities {
            yaml.push_str(&format!(
                "  {name}: {{priority: {p}, quota: {{limit: 10, period: 1h}}}}\n"
            ));
        }
        yaml.push_str("services: []\n");
        crate::config::parse(&yaml, "gw.yaml").expect("valid").plans
    }

    fn policy(name: &str, priority: u32) -> PlanPolicy {
        let cfg = crate::config::parse(
            &format!(
                "plans:\n  {name}: {{priority: {priority}, quota: {{limit: 10, period: 1h}}}}\nservices: []\n"
            ),
            "gw.yaml",
        )
        .expect("valid");
        let plans = crate::limits::Plans::build(&cfg).expect("plans");
        (**plans.resolve(Some(name)).expect("plan")).clone()
    }

    #[test]
    fn rank_limits_leave_room_for_the_levels_above() {
        assert_eq!(rank_limits(10, 0), Vec::<u64>::new());
        assert_eq!(rank_limits(10, 1), vec![10]);
        assert_eq!(rank_limits(10, 2), vec![9, 10]);
        assert_eq!(rank_limits(200, 3), vec![160, 180, 200]);
        // Many levels: the step shrinks so the lowest keeps half.
        assert_eq!(
            rank_limits(200, 11),
            vec![100, 110, 120, 130, 140, 150, 160, 170, 180, 190, 200]
        );
        // Tiny limits: at least one place for every level, the top keeps the whole.
        assert_eq!(rank_limits(1, 3), vec![1, 1, 1]);
        assert_eq!(rank_limits(2, 2), vec![1, 2]);
        assert_eq!(rank_limits(3, 5), vec![1, 1, 1, 2, 3]);
        for max in 1..300u64 {
            for k in 1..12usize {
                let l = rank_limits(max, k);
                assert_eq!(l.len(), k);
                assert_eq!(l[k - 1], max, "the top rank fills maxInFlight");
                assert!(l.windows(2).all(|w| w[0] <= w[1]), "{max} {k}: {l:?}");
                assert!(l.iter().all(|&x| x >= 1), "{max} {k}: {l:?}");
                if max >= 2 && k >= 2 {
                    assert!(
                        l[k - 2] < max,
                        "{max} {k}: the top rank keeps a place: {l:?}"
                    );
                }
                if max as usize >= 2 * (k - 1) {
                    assert!(
                        l[0] >= max - max / 2,
                        "{max} {k}: the lowest keeps half: {l:?}"
                    );
                }
                if max as usize >= k {
                    assert!(l.windows(2).all(|w| w[0] < w[1]), "{max} {k}: {l:?}");
                }
            }
        }
    }

    #[test]
    fn a_lower_plan_never_takes_the_places_of_a_higher_one() {
        let inf = InFlight::build(10, &plans(&[("free", 0), ("pro", 10)]), test_metrics());
        let (free, pro) = (policy("free", 0), policy("pro", 10));
        let mut held = Vec::new();
        while let Some(g) = inf.try_enter(inf.limit(true, Some(&free))) {
            held.push(g);
        }
        assert_eq!(held.len(), 9);
        assert!(
            inf.try_enter(inf.limit(true, None)).is_none(),
            "no plan: lowest"
        );
        held.push(
            inf.try_enter(inf.limit(true, Some(&pro)))
                .expect("pro's place"),
        );
        assert!(inf.try_enter(inf.limit(true, Some(&pro))).is_none());
        assert_eq!(inf.in_flight(), 10);
        held.clear();
        assert_eq!(inf.in_flight(), 0);
        // A route that does not apply plans: the whole limit for everyone.
        let mut held = Vec::new();
        while let Some(g) = inf.try_enter(inf.limit(false, None)) {
            held.push(g);
        }
        assert_eq!(held.len(), 10);
        // One plan, or none: the whole limit.
        let one = InFlight::build(10, &plans(&[("free", 0)]), test_metrics());
        assert_eq!(one.limit(true, Some(&free)), 10);
        assert_eq!(one.limit(true, None), 10);
        let none = InFlight::build(10, &Default::default(), test_metrics());
        assert_eq!(none.limit(true, None), 10);
        // Equal priorities are one level.
        let same = InFlight::build(10, &plans(&[("free", 5), ("pro", 5)]), test_metrics());
        assert_eq!(same.limits(), &[10]);
    }

    #[test]
    fn shed_requests_are_counted_by_plan() {
        let inf = InFlight::build(1, &plans(&[("free", 0), ("pro", 10)]), test_metrics());
        inf.count_shed(Some("pro"));
        inf.count_shed(Some("pro"));
        inf.count_shed(None);
        let got: Vec<_> = inf.shed().collect();
        assert_eq!(got, vec![(None, 1), (Some("free"), 0), (Some("pro"), 2)]);
    }

    #[test]
    fn the_count_never_passes_the_limit_under_contention() {
        let inf = std::sync::Arc::new(InFlight::build(7, &Default::default(), test_metrics()));
        let peak = std::sync::Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (inf, peak) = (inf.clone(), peak.clone());
                std::thread::spawn(move || {
                    for _ in 0..20_000 {
                        if let Some(_g) = inf.try_enter(7) {
                            peak.fetch_max(inf.in_flight(), Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(peak.load(Ordering::Relaxed) <= 7);
        assert_eq!(inf.in_flight(), 0);
    }
}
