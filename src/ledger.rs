//! The quota ledger on the admin listener: read, reset and credit a consumer's quota counters,
//! in the store requests are counted in (memory, or Redis shared by every instance).
//!
//! - `GET /admin/quotas?consumer=C`: every quota counter of C (its plan's, and each route's
//!   quota keyed by consumer) with limit, used, remaining and the seconds until the oldest
//!   counted request leaves the window;
//! - `DELETE /admin/quotas?consumer=C[&scope=S]`: reset (S: `plan` or a service name; all when
//!   absent);
//! - `POST /admin/quotas/credit?consumer=C&scope=S&amount=N`: N more requests in the current
//!   window.
//!
//! Each change is one atomic operation in the store (a Lua script, or the memory shard's lock),
//! logged with who asked and counted in `hexgate_quota_ledger_changes_total{action}`.

use std::sync::Arc;

use http::{Method, StatusCode};
use serde_json::{json, Value};

use crate::limits::{KeyKind, PlanPolicy, QuotaPolicy, QuotaUsage};
use crate::snapshot::Snapshot;
use crate::state::State;

/// The scope name of a consumer's plan quota.
pub const PLAN_SCOPE: &str = "plan";

pub use crate::limits::MAX_CREDIT;

/// A ledger answer: status and JSON body.
pub type Answer = (StatusCode, Value);

fn refuse(status: StatusCode, message: impl Into<String>) -> Answer {
    (
        status,
        json!({ "error": message.into(), "status": status.as_u16() }),
    )
}

/// The query parameters the ledger takes.
#[derive(Debug, Default, PartialEq, Eq)]
struct Query {
    consumer: String,
    scope: Option<String>,
    amount: Option<String>,
    plan: Option<String>,
}

fn parse_query(query: Option<&str>) -> Result<Query, String> {
    let mut q = Query::default();
    let mut consumer = None;
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        let slot = match &*k {
            "consumer" => &mut consumer,
            "scope" => &mut q.scope,
            "amount" => &mut q.amount,
            "plan" => &mut q.plan,
            other => {
                return Err(format!(
                    "unknown parameter {other:?} (consumer, scope, amount, plan)"
                ))
            }
        };
        if slot.is_some() {
            return Err(format!("parameter {k:?} given twice"));
        }
        // Percent-escapes that are not UTF-8 decode to U+FFFD: two different inputs would
        // name one consumer.
        if v.contains('\u{FFFD}') {
            return Err(format!("parameter {k:?} is not UTF-8"));
        }
        *slot = Some(v.into_owned());
    }
    q.consumer = consumer
        .filter(|c| !c.is_empty())
        .ok_or("the consumer parameter is required (?consumer=ID)")?;
    if q.consumer.len() > 1024 || q.consumer.chars().any(char::is_control) {
        return Err("the consumer is at most 1024 bytes, no control characters".into());
    }
    Ok(q)
}

/// One counter of a consumer: where it applies, the limit that applies, the policy naming its
/// store key.
struct Counter<'s> {
    scope: String,
    plan: Option<Arc<str>>,
    limit: u64,
    policy: &'s QuotaPolicy,
}

/// The consumer's quota counters under `snap`: its plan quota(s), then each route quota keyed
/// by consumer. A plan counter names the plan that last counted in it; a consumer with no plan
/// counter yet is shown its plan's empty one (the plan of its API keys, else the default plan).
async fn counters<'s>(
    state: &State,
    snap: &'s Snapshot,
    consumer: &str,
) -> Result<Vec<(Counter<'s>, QuotaUsage)>, String> {
    let mut out = Vec::new();
    if let Some(plans) = &snap.plans {
        // The consumer's plan when no counter names one: its keys' plan, else the default.
        let known: Option<Arc<PlanPolicy>> = snap
            .api_keys
            .as_ref()
            .map(|k| k.store.plans_of(consumer))
            .and_then(|p| p.first().and_then(|n| plans.get(n)).cloned())
            .or_else(|| plans.default.clone());
        // One counter per quota period (plans with the same period share it).
        let mut seen_periods = Vec::new();
        for p in plans.iter() {
            let Some(q) = &p.quota else { continue };
            if seen_periods.contains(&q.period_secs) {
                continue;
            }
            seen_periods.push(q.period_secs);
            let usage = state
                .limiter
                .quota_read(q, consumer)
                .await
                .map_err(|e| e.to_string())?;
            let named = plans.by_tag(usage.tag).filter(|_| usage.tag != 0);
            let fallback = known.as_ref().filter(|k| {
                k.quota
                    .as_ref()
                    .is_some_and(|kq| kq.period_secs == q.period_secs)
            });
            let Some(plan) = named.or(fallback) else {
                if usage.exists() {
                    // Counted under a plan no longer configured: shown, with no limit.
                    out.push((
                        Counter {
                            scope: PLAN_SCOPE.into(),
                            plan: None,
                            limit: 0,
                            policy: q,
                        },
                        usage,
                    ));
                }
                continue;
            };
            let limit = plan.quota.as_ref().map_or(0, |pq| pq.limit);
            out.push((
                Counter {
                    scope: PLAN_SCOPE.into(),
                    plan: Some(plan.name.clone()),
                    limit,
                    policy: q,
                },
                usage,
            ));
        }
    }
    for svc in &snap.services {
        let Some(q) = svc.limits.as_ref().and_then(|l| l.quota.as_ref()) else {
            continue;
        };
        if q.key != KeyKind::Consumer {
            continue;
        }
        let usage = state
            .limiter
            .quota_read(q, consumer)
            .await
            .map_err(|e| e.to_string())?;
        out.push((
            Counter {
                scope: svc.name.clone(),
                plan: None,
                limit: q.limit,
                policy: q,
            },
            usage,
        ));
    }
    Ok(out)
}

fn shown(c: &Counter, u: &QuotaUsage) -> Value {
    json!({
        "scope": c.scope,
        "plan": c.plan.as_deref(),
        "limit": c.limit,
        "periodSeconds": c.policy.period_secs,
        "used": u.used,
        "credit": u.credit,
        "remaining": u.remaining(c.limit),
        "resetSeconds": u.leaves_us.div_ceil(1_000_000),
    })
}

/// `/admin/quotas` and `/admin/quotas/credit`. `who`: the caller as the audit log names it.
pub async fn handle(
    state: &State,
    method: &Method,
    path: &str,
    query: Option<&str>,
    who: &str,
) -> Answer {
    let q = match parse_query(query) {
        Ok(q) => q,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, e),
    };
    let snap = state.snapshot.load_full();
    let unavailable = |e: String| {
        refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the limit store did not answer: {e}"),
        )
    };
    let all = match counters(state, &snap, &q.consumer).await {
        Ok(c) => c,
        Err(e) => return unavailable(e),
    };
    let scopes: Vec<String> = {
        let mut s: Vec<String> = all.iter().map(|(c, _)| c.scope.clone()).collect();
        s.dedup();
        s
    };
    if let Some(scope) = &q.scope {
        if !scopes.contains(scope) {
            return refuse(
                StatusCode::NOT_FOUND,
                format!(
                    "consumer {:?} has no quota in scope {scope:?} (scopes: {})",
                    q.consumer,
                    if scopes.is_empty() {
                        "none".into()
                    } else {
                        scopes.join(", ")
                    }
                ),
            );
        }
    }
    let selected: Vec<&(Counter, QuotaUsage)> = all
        .iter()
        .filter(|(c, _)| q.scope.as_ref().is_none_or(|s| *s == c.scope))
        .filter(|(c, _)| q.plan.is_none() || c.plan.as_deref() == q.plan.as_deref())
        .collect();
    if let (Some(plan), true) = (&q.plan, selected.is_empty()) {
        return refuse(
            StatusCode::NOT_FOUND,
            format!("consumer {:?} has no counter of plan {plan:?}", q.consumer),
        );
    }
    match (method, path) {
        (&Method::GET | &Method::HEAD, "/admin/quotas") => (
            StatusCode::OK,
            json!({
                "consumer": q.consumer,
                "quotas": selected.iter().map(|(c, u)| shown(c, u)).collect::<Vec<_>>(),
            }),
        ),
        (&Method::DELETE, "/admin/quotas") => {
            let mut reset = Vec::new();
            for (c, _) in &selected {
                if let Err(e) = state.limiter.quota_reset(c.policy, &q.consumer).await {
                    return unavailable(e.to_string());
                }
                // Values quoted and escaped, so a consumer id cannot forge the line's fields.
                tracing::info!(by = ?who, consumer = ?q.consumer, scope = ?c.scope, plan = ?c.plan.as_deref().unwrap_or("-"), "quota reset");
                reset.push(c.scope.clone());
            }
            if !reset.is_empty() {
                state.metrics.record_ledger_change("reset");
            }
            reset.dedup();
            (
                StatusCode::OK,
                json!({ "consumer": q.consumer, "reset": reset }),
            )
        }
        (&Method::POST, "/admin/quotas/credit") => {
            let Some(scope) = &q.scope else {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "the scope parameter is required (scopes of {:?}: {})",
                        q.consumer,
                        scopes.join(", ")
                    ),
                );
            };
            let amount = match q.amount.as_deref().map(str::parse::<u64>) {
                Some(Ok(n)) if (1..=MAX_CREDIT).contains(&n) => n,
                _ => {
                    return refuse(
                        StatusCode::BAD_REQUEST,
                        format!("amount must be a whole number from 1 to {MAX_CREDIT}"),
                    )
                }
            };
            let [(c, _)] = selected[..] else {
                return refuse(
                    StatusCode::CONFLICT,
                    format!(
                        "consumer {:?} has {} counters in scope {scope:?}: name one with plan=",
                        q.consumer,
                        selected.len()
                    ),
                );
            };
            // One step: the credit and the counter after it (no second read that could fail
            // after the credit was given, inviting a retry that would give it twice).
            let after = match state.limiter.quota_credit(c.policy, &q.consumer, amount).await {
                Ok((true, after)) => after,
                Ok((false, now)) => {
                    return refuse(
                        StatusCode::CONFLICT,
                        format!(
                            "the window already holds a credit of {}: at most {MAX_CREDIT} in one window",
                            now.credit
                        ),
                    )
                }
                Err(e) => return unavailable(e.to_string()),
            };
            state.metrics.record_ledger_change("credit");
            tracing::info!(by = ?who, consumer = ?q.consumer, scope = ?c.scope, plan = ?c.plan.as_deref().unwrap_or("-"), amount, "quota credited");
            (
                StatusCode::OK,
                json!({ "consumer": q.consumer, "credited": amount, "quota": shown(c, &after) }),
            )
        }
        _ => refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "GET or DELETE /admin/quotas, POST /admin/quotas/credit",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_decoded_and_checked() {
        let q = parse_query(Some("consumer=acme%20corp&scope=plan&amount=5")).unwrap();
        assert_eq!(q.consumer, "acme corp");
        assert_eq!(q.scope.as_deref(), Some("plan"));
        assert_eq!(q.amount.as_deref(), Some("5"));
        assert!(parse_query(None).is_err());
        assert!(parse_query(Some("consumer=")).is_err());
        assert!(parse_query(Some("consumer=a&consumer=b")).is_err());
        assert!(parse_query(Some("consumer=a&bogus=1")).is_err());
        assert!(parse_query(Some("consumer=a%0Ab")).is_err());
    }
}
