//! Step 2 of the pipeline: the compiled route matcher and the routing of a request. Matching runs on the normalised path (`rules::path`) and the
//! canonical host (`rules::host`); the same normalised path goes upstream, so a path or host
//! trick cannot reach one route through another's prefix or host condition.

use std::collections::HashMap;
use std::sync::Arc;

use http::Request;

use crate::config::{EscapedSlashes, PathType};
use crate::error::GatewayError;
use crate::rules::host::{host_matches, Authority};
use crate::rules::path::{self, PathError};
use crate::snapshot::{ServiceRt, Snapshot};

/// One route: a path (prefix or exact), optional hosts and methods, and its service.
pub struct Route {
    pub path: String,
    pub path_type: PathType,
    pub hosts: Vec<String>,
    pub methods: Vec<http::Method>,
    pub service: Arc<ServiceRt>,
}

impl Route {
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
#[derive(Default)]
pub struct Router {
    exact: HashMap<String, Vec<Arc<Route>>>,
    /// (prefix length, prefixes of that length), longest first.
    prefixes: Vec<(usize, HashMap<String, Vec<Arc<Route>>>)>,
}

impl Router {
    pub fn new(routes: Vec<Route>) -> Self {
        let mut r = Router::default();
        let mut by_len: HashMap<usize, HashMap<String, Vec<Arc<Route>>>> = HashMap::new();
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
    ) -> Option<&Arc<Route>> {
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

/// What routing found out about a request, reused by the later steps.
pub struct Routed {
    pub service: Arc<ServiceRt>,
    /// The normalised path, when it differs from the request's.
    pub normalized: Option<String>,
    /// The request's canonical authority (`rules::host`), sent upstream as Host and
    /// X-Forwarded-Host.
    pub host: Option<Authority>,
}

/// Step 2: the route for a request, on the canonical host (step 1) and the normalised path, so
/// HTTP/1 and HTTP/2 requests are matched on the same values. `escapedSlashes` and the
/// ambiguous-path check (a reading of the path a backend may take that reaches another route)
/// are decided here.
pub fn route_request<B>(
    snap: &Snapshot,
    req: &Request<B>,
    host: Option<Authority>,
) -> Result<Routed, GatewayError> {
    let raw_path = req.uri().path();
    let escapes = path::scan(raw_path)?;
    let norm = path::normalize_path(raw_path)?;
    let host_name = host.as_ref().map(Authority::host);
    let route = snap
        .router
        .find(host_name, req.method(), &norm)
        .ok_or(GatewayError::NoRoute)?;
    let (route, norm) = if !escapes.separators {
        (route, norm)
    } else {
        match route.service.escaped_slashes {
            EscapedSlashes::Keep => (route, norm),
            EscapedSlashes::Reject => return Err(PathError::EncodedSeparator.into()),
            EscapedSlashes::Decode => {
                // Separators count as separators: route again on the decoded path, and only a
                // route that also decodes may take it.
                let decoded = path::normalize_path_decoding_separators(raw_path)?;
                let route = snap
                    .router
                    .find(host_name, req.method(), &decoded)
                    .ok_or(GatewayError::NoRoute)?;
                if route.service.escaped_slashes != EscapedSlashes::Decode {
                    return Err(PathError::EncodedSeparator.into());
                }
                (route, std::borrow::Cow::Owned(decoded.into_owned()))
            }
        }
    };
    // The same request must route the same however the backend reads the path: with `;`
    // segment parameters removed (servlet containers), and, on a `keep` route, with its escaped
    // separators decoded. A reading that reaches another route is refused.
    // (A reading that reaches no route reaches only this route's backend, under this route's
    // checks: not ambiguous.)
    let ambiguous = |alt: &str| {
        snap.router
            .find(host_name, req.method(), alt)
            .is_some_and(|r| !Arc::ptr_eq(r, route))
    };
    if let Some(alt) = path::without_segment_params(&norm) {
        if ambiguous(&alt) {
            return Err(PathError::Ambiguous.into());
        }
    }
    if escapes.separators && route.service.escaped_slashes == EscapedSlashes::Keep {
        // Both orders a backend may take, from the path that goes upstream: parameters removed
        // then separators decoded (Tomcat), and decoded then parameters removed.
        let params_first = path::strip_segment_params(&norm)
            .map(|p| path::normalize_path_decoding_separators(&p).map(|c| c.into_owned()))
            .transpose()?;
        let decoded = path::normalize_path_decoding_separators(&norm)?;
        let decode_first =
            path::without_segment_params(&decoded).unwrap_or_else(|| decoded.into_owned());
        if params_first.iter().any(|p| ambiguous(p)) || ambiguous(&decode_first) {
            return Err(PathError::Ambiguous.into());
        }
    }
    let changed = match norm {
        std::borrow::Cow::Owned(p) => Some(p),
        std::borrow::Cow::Borrowed(_) => None,
    };
    Ok(Routed {
        service: route.service.clone(),
        normalized: changed,
        host,
    })
}
