//! Step 2c of the pipeline, and part of every routed response: CORS (the Fetch standard's CORS
//! protocol). A preflight is answered here and never forwarded; the response fields go on every
//! answer of the route, the gateway's refusals included.

use http::{HeaderName, HeaderValue, Request, Response};

use crate::body::Body;
use crate::config::Cors;
use crate::snapshot::ServiceRt;

/// A route's `cors`, compiled.
#[derive(Debug)]
pub struct CorsRt {
    pub cfg: Cors,
}

impl CorsRt {
    pub fn build(cfg: &Cors) -> CorsRt {
        CorsRt { cfg: cfg.clone() }
    }
}

/// A preflight (OPTIONS with Origin and Access-Control-Request-Method) on a route with `cors`:
/// the gateway's answer. None for any other request.
pub fn preflight<B>(_svc: &ServiceRt, _req: &Request<B>) -> Option<Response<Body>> {
    None
}

/// The CORS response fields for a request with this `Origin` (none when the origin is not
/// allowed or the route has no `cors`).
pub fn response_fields(
    _svc: &ServiceRt,
    _origin: Option<&HeaderValue>,
) -> Vec<(HeaderName, HeaderValue)> {
    Vec::new()
}
