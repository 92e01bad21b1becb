//! Step 2c of the pipeline, and part of every routed response: CORS (the Fetch standard's CORS
//! protocol). A preflight is answered here and never forwarded; the response fields go on every
//! answer of the route, the gateway's refusals included.
//!
//! - **Origins**: exact (`scheme://host[:port]`, scheme and host in any case, no default port
//!   implied), `*` (any), or `scheme://*.suffix[:port]` (one or more labels before `suffix`;
//!   never `suffix` itself, never `evil-suffix`).
//! - **Preflight** (OPTIONS with a non-empty `Origin` and `Access-Control-Request-Method`):
//!   always a 204 from the gateway. It grants (Access-Control-Allow-Methods, -Allow-Headers,
//!   -Max-Age) only when the origin, the method (in `allowMethods`, or a CORS-safelisted
//!   GET/HEAD/POST, compared case-sensitively as the Fetch standard does) and every requested
//!   header (in `allowHeaders`, any case; `Accept`, `Accept-Language` and `Content-Language`
//!   need not be listed) are allowed. Otherwise it carries no Access-Control-Allow-* field at
//!   all (the answer is marked [`Preflight`] `{ granted: false }`, and `proxy::finish` adds
//!   nothing to it), and the browser fails the preflight. Envoy answers preflights itself too (200, and with `forward_not_matching_preflights: false`
//!   those of other origins, without CORS fields); it never refuses one with a 403.
//! - **Every answer** of the route (`response_fields`, added by `proxy::finish`): for an
//!   allowed origin Access-Control-Allow-Origin (the origin echoed; `*` when the list has `*`,
//!   which never goes with credentials), -Allow-Credentials, -Expose-Headers; `Vary: Origin`
//!   whenever the answer depends on the origin (the list is not `*`), so no cache serves one
//!   origin's answer to another.
//!
//! Everything but the echoed origin and the requested headers is built once, in
//! [`CorsRt::build`].

use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE,
    ACCESS_CONTROL_REQUEST_HEADERS, ACCESS_CONTROL_REQUEST_METHOD, ORIGIN, VARY,
};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};

use crate::body::Body;
use crate::config::Cors;

/// The Fetch standard's CORS-safelisted methods: a browser never needs them listed in
/// Access-Control-Allow-Methods.
const SAFELISTED_METHODS: [&str; 3] = ["GET", "HEAD", "POST"];

/// CORS-safelisted request-header names a preflight may still name (a browser lists them only
/// for an unusual value, such as one over 128 bytes): allowed without being in `allowHeaders`.
/// `Content-Type` and `Range` are not among them: a browser asks for those exactly when their
/// value is not safelisted (`application/json`, several ranges), which is what a preflight
/// guards, so they must be listed.
const SAFELISTED_HEADERS: [&str; 3] = ["accept", "accept-language", "content-language"];

const STAR: HeaderValue = HeaderValue::from_static("*");
const TRUE: HeaderValue = HeaderValue::from_static("true");
const VARY_ORIGIN: HeaderValue = HeaderValue::from_static("Origin");
const VARY_PREFLIGHT: HeaderValue = HeaderValue::from_static(
    "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
);

/// One entry of `allowOrigins` other than `*`.
#[derive(Debug)]
enum OriginRule {
    /// `scheme://host[:port]`, lower case.
    Exact(String),
    /// `scheme://*.suffix[:port]`: `prefix` is `scheme://`, `suffix` is `.suffix[:port]`.
    Subdomains { prefix: String, suffix: String },
}

impl OriginRule {
    fn parse(o: &str) -> OriginRule {
        match o.split_once("://*.") {
            Some((scheme, rest)) => OriginRule::Subdomains {
                prefix: format!("{scheme}://"),
                suffix: format!(".{rest}"),
            },
            None => OriginRule::Exact(o.to_string()),
        }
    }

    fn matches(&self, origin: &[u8]) -> bool {
        match self {
            OriginRule::Exact(o) => origin.eq_ignore_ascii_case(o.as_bytes()),
            OriginRule::Subdomains { prefix, suffix } => {
                let (p, s) = (prefix.as_bytes(), suffix.as_bytes());
                if origin.len() <= p.len() + s.len()
                    || !origin[..p.len()].eq_ignore_ascii_case(p)
                    || !origin[origin.len() - s.len()..].eq_ignore_ascii_case(s)
                {
                    return false;
                }
                // One or more DNS labels: letters, digits, `-`, separated by single dots.
                let labels = &origin[p.len()..origin.len() - s.len()];
                labels.split(|b| *b == b'.').all(|l| {
                    !l.is_empty() && l.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-')
                })
            }
        }
    }
}

/// A route's `cors`, compiled.
#[derive(Debug)]
pub struct CorsRt {
    pub cfg: Cors,
    /// `allowOrigins` has `*`: every origin, answered with `*`.
    any_origin: bool,
    origins: Vec<OriginRule>,
    /// `allowMethods` has `*`: any method (the requested one is echoed).
    any_method: bool,
    /// `allowHeaders` has `*`: any header (the requested ones are echoed).
    any_header: bool,
    /// Access-Control-Allow-Methods: `allowMethods` joined (None when empty or `*`).
    allow_methods: Option<HeaderValue>,
    /// Access-Control-Max-Age, in seconds.
    max_age: Option<HeaderValue>,
    /// Access-Control-Expose-Headers: `exposeHeaders` joined.
    expose: Option<HeaderValue>,
}

impl CorsRt {
    pub fn build(cfg: &Cors) -> CorsRt {
        let joined = |list: &[String]| -> Option<HeaderValue> {
            (!list.is_empty())
                .then(|| HeaderValue::from_str(&list.join(", ")).ok())
                .flatten()
        };
        let any_method = cfg.allow_methods.iter().any(|m| m == "*");
        CorsRt {
            any_origin: cfg.allow_origins.iter().any(|o| o == "*"),
            origins: cfg
                .allow_origins
                .iter()
                .filter(|o| *o != "*")
                .map(|o| OriginRule::parse(o))
                .collect(),
            any_method,
            any_header: cfg.allow_headers.iter().any(|h| h == "*"),
            allow_methods: if any_method {
                None
            } else {
                joined(&cfg.allow_methods)
            },
            max_age: cfg.max_age.map(|d| HeaderValue::from(d.as_secs())),
            expose: joined(&cfg.expose_headers),
            cfg: cfg.clone(),
        }
    }

    /// Whether `origin` (an `Origin` value) is allowed.
    fn allows_origin(&self, origin: &HeaderValue) -> bool {
        !origin.is_empty()
            && (self.any_origin || self.origins.iter().any(|r| r.matches(origin.as_bytes())))
    }

    /// Whether a preflight's requested method is allowed: listed (case-sensitively: the
    /// config is upper case, and a browser upper-cases only the standard methods), or
    /// CORS-safelisted.
    fn allows_method(&self, method: &HeaderValue) -> bool {
        let m = method.as_bytes();
        self.any_method
            || SAFELISTED_METHODS.iter().any(|s| s.as_bytes() == m)
            || self.cfg.allow_methods.iter().any(|a| a.as_bytes() == m)
    }

    /// Whether every header a preflight asks for (`Access-Control-Request-Headers`, a
    /// comma-separated list, possibly over several fields) is allowed.
    fn allows_headers(&self, headers: &HeaderMap) -> bool {
        headers
            .get_all(ACCESS_CONTROL_REQUEST_HEADERS)
            .iter()
            .all(|v| {
                let Ok(v) = v.to_str() else {
                    return false;
                };
                v.split(',')
                    .map(str::trim)
                    .filter(|h| !h.is_empty())
                    .all(|h| {
                        self.any_header
                            || SAFELISTED_HEADERS.iter().any(|s| s.eq_ignore_ascii_case(h))
                            || self
                                .cfg
                                .allow_headers
                                .iter()
                                .any(|a| a.eq_ignore_ascii_case(h))
                    })
            })
    }
}

/// A preflight (OPTIONS with Origin and Access-Control-Request-Method) on a route with `cors`:
/// the gateway's answer. None for any other request.
///
/// The answer carries what only a preflight needs (Access-Control-Allow-Methods, -Allow-Headers
/// and -Max-Age when it is granted, and `Vary` on the request fields it depends on);
/// Access-Control-Allow-Origin and the rest come from [`response_fields`], added by
/// `proxy::finish` to a preflight that is granted.
pub fn preflight<B>(service: &str, cors: &CorsRt, req: &Request<B>) -> Option<Response<Body>> {
    if req.method() != Method::OPTIONS {
        return None;
    }
    let h = req.headers();
    let origin = h.get(ORIGIN).filter(|o| !o.is_empty())?;
    let method = h
        .get(ACCESS_CONTROL_REQUEST_METHOD)
        .filter(|m| !m.is_empty())?;
    let mut resp = Response::new(Body::Empty);
    *resp.status_mut() = StatusCode::NO_CONTENT;
    let out = resp.headers_mut();
    out.insert(VARY, VARY_PREFLIGHT);
    let origin_ok = cors.allows_origin(origin);
    let method_ok = cors.allows_method(method);
    let headers_ok = cors.allows_headers(h);
    if origin_ok && method_ok && headers_ok {
        if cors.any_method {
            out.insert(ACCESS_CONTROL_ALLOW_METHODS, method.clone());
        } else if let Some(m) = &cors.allow_methods {
            out.insert(ACCESS_CONTROL_ALLOW_METHODS, m.clone());
        }
        // Exactly what was asked for (every name checked above): the safelisted names a
        // browser may ask for are granted without being listed in the config.
        for v in h.get_all(ACCESS_CONTROL_REQUEST_HEADERS) {
            if !v.is_empty() {
                out.append(ACCESS_CONTROL_ALLOW_HEADERS, v.clone());
            }
        }
        if let Some(age) = &cors.max_age {
            out.insert(ACCESS_CONTROL_MAX_AGE, age.clone());
        }
    } else {
        tracing::debug!(
            service = %service,
            origin = ?origin,
            method = ?method,
            origin_ok,
            method_ok,
            headers_ok,
            "CORS preflight not granted"
        );
    }
    resp.extensions_mut().insert(Preflight {
        granted: origin_ok && method_ok && headers_ok,
    });
    Some(resp)
}

/// The CORS response fields the gateway owns on a route with `cors`: a backend's own are
/// removed, so the answer carries the route's policy and nothing else.
pub const OWNED: [HeaderName; 6] = [
    ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_ALLOW_CREDENTIALS,
    ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_HEADERS,
    ACCESS_CONTROL_EXPOSE_HEADERS,
    ACCESS_CONTROL_MAX_AGE,
];

/// Marks the gateway's answer to a preflight: `finish` adds the origin fields only to one that
/// grants it (a refused one carries no Access-Control-Allow-* field at all), and no second
/// Vary (the answer's own names Origin).
#[derive(Debug, Clone, Copy)]
pub struct Preflight {
    pub granted: bool,
}

/// The CORS response fields for a request with this `Origin` (none when the origin is not
/// allowed or the route has no `cors`), and `Vary: Origin` when the answer depends on it.
pub fn response_fields(
    cors: &CorsRt,
    origin: Option<&HeaderValue>,
) -> Vec<(HeaderName, HeaderValue)> {
    let mut out = Vec::with_capacity(4);
    let allow_origin = if cors.any_origin {
        // The same answer for every origin, and for requests without one: cacheable as is.
        Some(STAR)
    } else {
        out.push((VARY, VARY_ORIGIN));
        origin.filter(|o| cors.allows_origin(o)).cloned()
    };
    if let Some(o) = allow_origin {
        out.push((ACCESS_CONTROL_ALLOW_ORIGIN, o));
        if cors.cfg.allow_credentials {
            out.push((ACCESS_CONTROL_ALLOW_CREDENTIALS, TRUE));
        }
        if let Some(e) = &cors.expose {
            out.push((ACCESS_CONTROL_EXPOSE_HEADERS, e.clone()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cors(origins: &[&str]) -> CorsRt {
        CorsRt::build(&Cors {
            allow_origins: origins.iter().map(|o| o.to_string()).collect(),
            allow_methods: vec!["GET".into(), "PUT".into()],
            allow_headers: vec!["x-token".into(), "content-type".into()],
            expose_headers: vec![],
            allow_credentials: false,
            max_age: None,
        })
    }

    fn allows(c: &CorsRt, o: &'static str) -> bool {
        c.allows_origin(&HeaderValue::from_static(o))
    }

    #[test]
    fn exact_origins_compare_scheme_host_and_port() {
        let c = cors(&["https://a.com", "http://[::1]:8080"]);
        assert!(allows(&c, "https://a.com"));
        assert!(allows(&c, "HTTPS://A.Com"));
        assert!(allows(&c, "http://[::1]:8080"));
        for no in [
            "https://a.com:443",
            "https://a.com:8443",
            "http://a.com",
            "https://a.com/",
            "https://a.com.evil.com",
            "https://b.a.com",
            "null",
            "",
        ] {
            assert!(!allows(&c, no), "{no}");
        }
    }

    #[test]
    fn wildcard_origins_need_at_least_one_label() {
        let c = cors(&["https://*.example.com", "http://*.local.test:8080"]);
        for yes in [
            "https://a.example.com",
            "https://a.b.example.com",
            "https://A-1.Example.COM",
            "http://x.local.test:8080",
        ] {
            assert!(allows(&c, yes), "{yes}");
        }
        for no in [
            "https://example.com",
            "https://evil-example.com",
            "https://.example.com",
            "https://a..example.com",
            "https://a.example.com:8443",
            "http://a.example.com",
            "https://evil.com/.example.com",
            "https://user@a.example.com",
            "https://a.example.com.evil.com",
            "http://x.local.test",
            "http://x.local.test:80801",
        ] {
            assert!(!allows(&c, no), "{no}");
        }
    }

    #[test]
    fn star_allows_every_origin() {
        let c = cors(&["*"]);
        assert!(allows(&c, "https://anything.example"));
        assert!(allows(&c, "null"));
        assert!(!allows(&c, ""));
    }

    #[test]
    fn methods_are_case_sensitive_and_safelisted_ones_always_pass() {
        let c = cors(&["*"]);
        let m = |s: &'static str| c.allows_method(&HeaderValue::from_static(s));
        assert!(m("PUT") && m("GET") && m("POST") && m("HEAD"));
        assert!(!m("put") && !m("DELETE") && !m("PATCH"));
    }

    #[test]
    fn requested_headers_must_all_be_allowed() {
        let c = cors(&["*"]);
        let h = |v: &'static str| {
            let mut m = HeaderMap::new();
            m.insert(ACCESS_CONTROL_REQUEST_HEADERS, HeaderValue::from_static(v));
            c.allows_headers(&m)
        };
        assert!(h("x-token"));
        assert!(h("X-Token, Content-Type"));
        assert!(h("accept-language,x-token"));
        assert!(h(""));
        assert!(!h("x-token, x-other"));
        assert!(!h("range"));
        assert!(c.allows_headers(&HeaderMap::new()));
    }
}
