//! `retryOn`, `retryBudget` and `circuitBreaker` of a route: what is retried on another
//! backend, how many retries the route may spend, and when a failing backend is ejected.

use crate::config::{CircuitBreaker, Policies, RetryOn};

/// A route's retry and ejection policy, with its budget's state.
#[derive(Debug)]
pub struct RetryRt {
    pub on: Vec<RetryOn>,
    pub breaker: Option<CircuitBreaker>,
}

impl RetryRt {
    pub fn build(p: &Policies) -> RetryRt {
        RetryRt {
            on: p.retry_on.clone(),
            breaker: p.circuit_breaker,
        }
    }
}
