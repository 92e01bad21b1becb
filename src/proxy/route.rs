//! Step 2 of the pipeline: the route for a request (the matcher itself is `router`).

use std::sync::Arc;

use http::Request;

use crate::config::EscapedSlashes;
use crate::error::GatewayError;
use crate::rules::host::Authority;
use crate::rules::path::{self, PathError};
use crate::snapshot::{ServiceRt, Snapshot};

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
    if let Some(q) = req.uri().query() {
        path::check_query(q)?;
    }
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
