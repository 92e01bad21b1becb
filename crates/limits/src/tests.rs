use std::time::Duration;

use super::*;
use hexgate_config::{Quota, RateLimit};

const S: u64 = 1_000_000;

fn policies(cfg: &Config) -> RoutePolicies {
    let rate = RateLimit {
        enabled: true,
        rate_per_second: 1.0,
        burst: 3,
        key: hexgate_config::LimitKey::Consumer,
    };
    let quota = Quota {
        enabled: true,
        limit: 5,
        period: Duration::from_secs(3600),
        key: hexgate_config::LimitKey::Consumer,
    };
    RoutePolicies::build(cfg, "users", Some(&rate), Some(&quota)).expect("limits")
}

fn config() -> Config {
    hexgate_config::parse("rateLimitHeaders: both\nservices: []\n", "test.yaml").expect("config")
}

/// The issue "The embedded default does not enforce quotas": 1/s burst 3, quota 5 per hour per
/// consumer, one request every 0.2 s for 12 s. Each 429 from the rate limit used to give back a
/// quota slot twice, erasing an admitted request (15 admitted); exactly 5 pass.
#[tokio::test]
async fn memory_quota_holds_when_the_rate_limit_refuses() {
    let cfg = config();
    let clock = ManualClock::new(1_700_000_000 * S);
    let registry = Arc::new(Registry::default());
    let limiter = Limiter::with_clock(&cfg, registry.clone(), Clock::Manual(clock.clone()));
    assert!(!limiter.uses_redis());
    let p = policies(&cfg);
    let metrics = registry.service("users");
    let ip: IpAddr = "10.0.0.1".parse().unwrap();
    let mut admitted = Vec::new();
    for i in 0..60u64 {
        let v = limiter
            .check(
                Some(&p),
                None,
                &metrics,
                ip,
                Some("alice"),
                &HeaderMap::new(),
            )
            .await;
        assert!(!v.unavailable);
        if v.retry_after.is_none() {
            admitted.push(i);
        }
        clock.advance_us(S / 5);
    }
    // The burst (0, 0.2, 0.4 s), then one a second (1 s, 2 s), then the quota is used up.
    assert_eq!(admitted, vec![0, 1, 2, 5, 10], "admitted request numbers");
    // Another consumer still has its whole quota.
    let v = limiter
        .check(Some(&p), None, &metrics, ip, Some("bob"), &HeaderMap::new())
        .await;
    assert!(v.retry_after.is_none());
}

/// A request the rate limit refuses costs no quota, and its RateLimit field says so.
#[tokio::test]
async fn a_rate_refusal_reports_the_quota_slot_it_gave_back() {
    let cfg = config();
    // At the start of a quota bucket (60 s wide): the quota resets 61 buckets later.
    let clock = ManualClock::new(1_700_000_040 * S);
    let registry = Arc::new(Registry::default());
    let limiter = Limiter::with_clock(&cfg, registry.clone(), Clock::Manual(clock.clone()));
    let p = policies(&cfg);
    let metrics = registry.service("users");
    let ip: IpAddr = "10.0.0.1".parse().unwrap();
    let mut fields = Vec::new();
    for _ in 0..5 {
        let v = limiter
            .check(
                Some(&p),
                None,
                &metrics,
                ip,
                Some("alice"),
                &HeaderMap::new(),
            )
            .await;
        let (_, value) = v
            .headers
            .iter()
            .find(|(n, _)| n == "ratelimit")
            .expect("RateLimit field");
        fields.push((v.retry_after, value.to_str().unwrap().to_string()));
    }
    let t = 61 * 60;
    assert_eq!(
        fields,
        vec![
            (None, format!("\"rate\";r=2;t=1, \"quota\";r=4;t={t}")),
            (None, format!("\"rate\";r=1;t=2, \"quota\";r=3;t={t}")),
            (None, format!("\"rate\";r=0;t=3, \"quota\";r=2;t={t}")),
            (Some(1), format!("\"rate\";r=0;t=3, \"quota\";r=2;t={t}")),
            (Some(1), format!("\"rate\";r=0;t=3, \"quota\";r=2;t={t}")),
        ]
    );
}

#[test]
fn clocks() {
    let m = ManualClock::new(5);
    let c = Clock::Manual(m.clone());
    m.advance_us(10);
    assert_eq!(c.now_us(), 15);
    assert_eq!(c.manual_us(), Some(15));
    m.set_us(100);
    assert_eq!(c.now_us(), 100);
    let sys = Clock::System;
    assert_eq!(sys.manual_us(), None);
    assert!(sys.now_us() > 1_600_000_000 * S);
}
