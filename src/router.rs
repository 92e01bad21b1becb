//! The compiled route matcher, built with each snapshot. Matching runs on the normalised path
//! (`rules::path`) and the canonical host (`rules::host`); the same normalised path goes
//! upstream, so a path or host trick cannot reach one route through another's prefix or host
//! condition.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::PathType;
use crate::rules::host::host_matches;

/// One route: a path (prefix or exact), optional hosts and methods, and its service (`S`: the
/// snapshot's `ServiceRt`).
pub struct Route<S> {
    pub path: String,
    pub path_type: PathType,
    pub hosts: Vec<String>,
    pub methods: Vec<http::Method>,
    pub service: Arc<S>,
}

impl<S> Route<S> {
    fn accepts(&self, host: Option<&str>, method: &http::Method) -> bool {
        (self.methods.is_empty() || self.methods.contains(method))
            && (self.hosts.is_empty()
                || host.is_some_and(|h| self.hosts.iter().any(|x| host_matches(x, h))))
    }

    /// Routes with host or method conditions are tried before catch-alls on the same path.
    fn specificity(&self) -> u8 {
        u8::from(!self.hosts.is_empty()) * 2 + u8::from(!self.methods.is_empty())
    }
}

/// Longest-prefix matcher: one hash lookup per distinct prefix length, longest first, so the cost
/// grows with the number of distinct lengths, not the number of routes.
pub struct Router<S> {
    exact: HashMap<String, Vec<Arc<Route<S>>>>,
    /// (prefix length, prefixes of that length), longest first.
    prefixes: Vec<(usize, HashMap<String, Vec<Arc<Route<S>>>>)>,
}

impl<S> Router<S> {
    pub fn new(routes: Vec<Route<S>>) -> Self {
        let mut r = Router {
            exact: HashMap::new(),
            prefixes: Vec::new(),
        };
        let mut by_len: HashMap<usize, HashMap<String, Vec<Arc<Route<S>>>>> = HashMap::new();
        for route in routes {
            let route = Arc::new(route);
            let list = match route.path_type {
                PathType::Exact => r.exact.entry(route.path.clone()).or_default(),
                PathType::Prefix => by_len
                    .entry(route.path.len())
                    .or_default()
                    .entry(route.path.clone())
                    .or_default(),
            };
            list.push(route);
            list.sort_by_key(|r| std::cmp::Reverse(r.specificity()));
        }
        r.prefixes = by_len.into_iter().collect();
        r.prefixes.sort_by_key(|(len, _)| std::cmp::Reverse(*len));
        r
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.prefixes.is_empty()
    }

    /// The best route for a normalised path, or None (404).
    pub fn find(
        &self,
        host: Option<&str>,
        method: &http::Method,
        path: &str,
    ) -> Option<&Arc<Route<S>>> {
        if let Some(list) = self.exact.get(path) {
            if let Some(r) = list.iter().find(|r| r.accepts(host, method)) {
                return Some(r);
            }
        }
        for (len, map) in &self.prefixes {
            if *len > path.len() || !path.is_char_boundary(*len) {
                continue;
            }
            if let Some(list) = map.get(&path[..*len]) {
                if let Some(r) = list.iter().find(|r| r.accepts(host, method)) {
                    return Some(r);
                }
            }
        }
        None
    }
}
