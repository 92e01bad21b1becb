//! Step 7 of the pipeline: the request as the backend gets it. Hop-by-hop fields go (RFC 9110
//! 7.6.1), the forwarding fields are set (X-Forwarded-For/-Proto/-Host, X-Request-Id; spoofed
//! proxy fields from untrusted peers removed), identity headers come from the gateway only, the
//! path is the normalised one (with `stripPath`), Host is the canonical authority, and the body
//! is wrapped so its progress and limits are known.
//!
//! Upgrades: only the route's `allowedUpgrades` tokens are forwarded (default `websocket`); a
//! request asking for others goes upstream as an ordinary request. A tunnel opens only when the
//! backend's 101 completes the handshake the client asked for (`check_switch`: the right
//! protocol, and for WebSocket the right `Sec-WebSocket-Accept`).

use std::sync::Arc;

use base64::Engine as _;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Uri, Version};
use hyper::body::Incoming;

use super::route::Routed;
use super::{ConnInfo, X_REQUEST_ID};
use crate::auth::Identity;
use crate::body::{Body, BodyProgress, ClientBody};
use crate::error::GatewayError;
use crate::snapshot::{ServiceRt, Snapshot};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The fixed hop-by-hop names (RFC 9110 7.6.1) besides Connection and Upgrade, in bit order.
const HOP_BY_HOP: [&str; 6] = [
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "proxy-authorization",
];
const HOP_CONNECTION: u8 = 1 << 6;
const HOP_UPGRADE: u8 = 1 << 7;

/// A header name's hop-by-hop bit (HOP_BY_HOP order, then Connection, Upgrade), or 0.
fn hop_bit(name: &str) -> u8 {
    match name {
        "connection" => HOP_CONNECTION,
        "upgrade" => HOP_UPGRADE,
        n => HOP_BY_HOP
            .iter()
            .position(|h| *h == n)
            .map_or(0, |i| 1 << i),
    }
}

/// Which hop-by-hop headers are present, as bits: one pass over the names.
pub(super) fn hop_by_hop_present(headers: &HeaderMap) -> u8 {
    headers.keys().fold(0, |bits, n| bits | hop_bit(n.as_str()))
}

/// Removes hop-by-hop headers (RFC 9110 7.6.1), including those named in Connection.
/// When `keep_upgrade` is set, `Connection: upgrade` and `Upgrade` survive (WebSocket).
/// `present` (from `hop_by_hop_present` or `scan_headers`) says which are there; only those are
/// removed (a response usually carries just `Connection: keep-alive`).
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap, present: u8, keep_upgrade: bool) {
    if present & HOP_CONNECTION != 0 {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .filter(|n| !(keep_upgrade && n == header::UPGRADE) && n != header::HOST)
            .collect();
        for n in named {
            headers.remove(n);
        }
        headers.remove(header::CONNECTION);
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(*name);
        }
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else if present & HOP_UPGRADE != 0 {
        headers.remove(header::UPGRADE);
    }
}

/// Proxy fields besides X-Forwarded-For/-Proto/-Host (which are always rewritten) that
/// backends read as the client's address, host, port, scheme or path prefix (RFC 7239
/// `Forwarded`, read by Spring's ForwardedHeaderFilter among others; nginx's `X-Real-IP`; the
/// other `X-Forwarded-*` Traefik and Spring set). Only a trusted proxy may send them: from
/// anyone else they are spoofs and are removed.
const PROXY_FIELDS: [&str; 11] = [
    "forwarded",
    "x-real-ip",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-server",
    "x-forwarded-scheme",
    "x-forwarded-ssl",
    "x-client-ip",
    "true-client-ip",
    // Path overrides some frameworks honour (IIS, Symfony, Laminas): a route's checks would
    // apply to one path and the backend would serve another.
    "x-original-url",
    "x-rewrite-url",
];

/// What one pass over a request's header names found.
struct Scan {
    /// Hop-by-hop headers present, as `hop_by_hop_present` bits.
    hop: u8,
    /// A gateway-owned identity header (X-Consumer-Id, forwarded claims) is present.
    identity: bool,
    /// One of `PROXY_FIELDS` is present.
    proxy: bool,
}

/// One pass over the request's header names. Most requests carry no hop-by-hop, identity or
/// proxy field, and then the removals (a hash and a probe per name) are skipped.
fn scan_headers(headers: &HeaderMap, identity: &[HeaderName]) -> Scan {
    let mut scan = Scan {
        hop: 0,
        identity: false,
        proxy: false,
    };
    for name in headers.keys() {
        let n = name.as_str();
        scan.hop |= hop_bit(n);
        scan.identity |= identity.iter().any(|h| h == name);
        // Every proxy field starts with f, t or x: most names skip the list.
        scan.proxy |=
            matches!(n.as_bytes().first(), Some(b'f' | b't' | b'x')) && PROXY_FIELDS.contains(&n);
    }
    scan
}

fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

static SEC_WEBSOCKET_KEY: HeaderName = HeaderName::from_static("sec-websocket-key");
static SEC_WEBSOCKET_VERSION: HeaderName = HeaderName::from_static("sec-websocket-version");
static SEC_WEBSOCKET_ACCEPT: HeaderName = HeaderName::from_static("sec-websocket-accept");
/// RFC 6455 section 1.3: appended to the client's key before hashing.
const WEBSOCKET_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// An upgrade the gateway forwards: what the backend's 101 must show to open a tunnel.
pub(super) struct Upgrade {
    /// The allowed tokens the client offered (lower-case), sent upstream as its Upgrade header.
    tokens: Vec<String>,
    /// When `websocket` is among them: the Sec-WebSocket-Accept the client's key calls for.
    websocket_accept: Option<String>,
}

/// Whether two Upgrade protocols (`name[/version]`, lower-case) are the same; a side that names
/// no version matches any.
fn same_protocol(a: &str, b: &str) -> bool {
    let (an, av) = a.split_once('/').map_or((a, None), |(n, v)| (n, Some(v)));
    let (bn, bv) = b.split_once('/').map_or((b, None), |(n, v)| (n, Some(v)));
    an == bn && (av.is_none() || bv.is_none() || av == bv)
}

/// Whether the route's `allowedUpgrades` entry `allowed` admits the offered protocol `offered`
/// (both lower-case): an entry without a version admits every version, one with a version only
/// that one.
fn admits(allowed: &str, offered: &str) -> bool {
    allowed == offered || (!allowed.contains('/') && offered.split('/').next() == Some(allowed))
}

/// The tokens of every `Upgrade` field in `headers`, trimmed and lower-cased.
fn upgrade_tokens(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// The one value of `name` in `headers`, trimmed; None when absent or repeated.
fn single<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Option<&'h [u8]> {
    let mut all = headers.get_all(name).iter();
    let v = all.next()?;
    all.next().is_none().then(|| v.as_bytes().trim_ascii())
}

/// Sec-WebSocket-Accept for a client's Sec-WebSocket-Key: base64(SHA-1(key + GUID)).
fn websocket_accept(key: &[u8]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key);
    ctx.update(WEBSOCKET_GUID);
    base64::engine::general_purpose::STANDARD.encode(ctx.finish())
}

/// What to do with an upgrade request (`is_upgrade`): Ok(Some) to forward the upgrade for the
/// allowed tokens it offers, Ok(None) when the route allows none of them (the request then goes
/// upstream as an ordinary one, as nginx does without upgrade configuration), or 400 for a
/// WebSocket handshake the backend could not complete either (RFC 6455 section 4.2.1).
fn plan_upgrade(headers: &HeaderMap, allowed: &[String]) -> Result<Option<Upgrade>, GatewayError> {
    let tokens: Vec<String> = upgrade_tokens(headers)
        .into_iter()
        .filter(|t| allowed.iter().any(|a| admits(a, t)))
        .collect();
    if tokens.is_empty() {
        return Ok(None);
    }
    let websocket_accept = if tokens.iter().any(|t| same_protocol(t, "websocket")) {
        let key = single(headers, &SEC_WEBSOCKET_KEY)
            .filter(|k| {
                base64::engine::general_purpose::STANDARD
                    .decode(k)
                    .is_ok_and(|raw| raw.len() == 16)
            })
            .ok_or(GatewayError::BadRequest(
                "WebSocket upgrade without a valid Sec-WebSocket-Key (one base64 value of 16 bytes)",
            ))?;
        if single(headers, &SEC_WEBSOCKET_VERSION) != Some(b"13".as_slice()) {
            return Err(GatewayError::BadRequest(
                "WebSocket upgrade with a Sec-WebSocket-Version other than 13",
            ));
        }
        Some(websocket_accept(key))
    } else {
        None
    };
    Ok(Some(Upgrade {
        tokens,
        websocket_accept,
    }))
}

/// Whether a backend's 101 completes the upgrade the gateway forwarded: its Upgrade names one
/// of the offered protocols, and for WebSocket it carries the accept the client's key calls
/// for. Anything else would tunnel raw bytes to a backend that never agreed to the protocol.
pub(super) fn check_switch(headers: &HeaderMap, upgrade: &Upgrade) -> Result<(), GatewayError> {
    // The first token is the protocol switched to (RFC 9110 section 7.8, listed in layer order).
    let switched = upgrade_tokens(headers);
    let Some(proto) = switched.first() else {
        return Err(GatewayError::BadUpgrade("101 without an Upgrade header"));
    };
    if !upgrade.tokens.iter().any(|t| same_protocol(t, proto)) {
        return Err(GatewayError::BadUpgrade(
            "101 switches to a protocol the client did not ask for",
        ));
    }
    if same_protocol(proto, "websocket") {
        let want = upgrade.websocket_accept.as_deref().map(str::as_bytes);
        if want.is_none() || single(headers, &SEC_WEBSOCKET_ACCEPT) != want {
            return Err(GatewayError::BadUpgrade(
                "101 without the Sec-WebSocket-Accept the client's key calls for",
            ));
        }
    }
    Ok(())
}

/// The path and query sent upstream: the normalised path, with `stripPath` or `rewrite`
/// applied (the query as it came). `normalized` is set when normalisation changed the
/// request's path. A rewrite whose result is not a path is a 500, logged, never forwarded.
fn upstream_uri(
    svc: &ServiceRt,
    uri: Uri,
    normalized: Option<String>,
) -> Result<Uri, GatewayError> {
    if normalized.is_none()
        && svc.strip_prefix.is_none()
        && svc.rewrite.is_none()
        && uri.scheme().is_none()
    {
        return Ok(uri); // already origin-form and normal: forward as is
    }
    let path = normalized.as_deref().unwrap_or(uri.path());
    let path: std::borrow::Cow<str> = match (&svc.strip_prefix, &svc.rewrite) {
        (Some(p), _) => match path.strip_prefix(p.as_str()) {
            Some(rest) if rest.starts_with('/') => rest.into(),
            _ => "/".into(),
        },
        (None, Some(rw)) => rw.apply(path).map_err(|(result, problem)| {
            tracing::error!(
                service = %svc.name,
                path,
                regex = rw.regex.as_str(),
                replacement = %rw.replacement,
                result = %result,
                problem = %problem,
                "rewrite produced an invalid path: answered 500, not forwarded"
            );
            GatewayError::Internal("the route's rewrite produced an invalid path".into())
        })?,
        (None, None) => path.into(),
    };
    if matches!(path, std::borrow::Cow::Borrowed(_))
        && normalized.is_none()
        && svc.strip_prefix.is_none()
        && uri.scheme().is_none()
    {
        return Ok(uri); // a rewrite that did not match: forward as is
    }
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.into_owned(),
    };
    Uri::try_from(pq).map_err(|e| {
        if svc.rewrite.is_some() {
            tracing::error!(
                service = %svc.name,
                error = %e,
                "rewrite produced an invalid request target: answered 500, not forwarded"
            );
        }
        GatewayError::Internal(format!("bad upstream uri: {e}"))
    })
}

/// Sets X-Forwarded-For/-Proto/-Host and X-Request-Id. A peer in `trustedProxies` is a proxy
/// whose forwarding fields are kept (and X-Forwarded-For appended to); from anyone else they
/// are replaced, and `PROXY_FIELDS` removed (`proxy_fields`: `scan_headers` saw one).
fn add_forwarded_headers(
    snap: &Snapshot,
    headers: &mut HeaderMap,
    conn: ConnInfo,
    host: Option<&str>,
    request_id: &str,
    proxy_fields: bool,
) {
    let peer_ip = conn.peer.ip().to_string();
    let trusted = snap.is_trusted_proxy(conn.peer.ip());
    if proxy_fields && !trusted {
        for name in PROXY_FIELDS {
            headers.remove(name);
        }
    }
    let xff = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) if trusted => format!("{prev}, {peer_ip}"),
        _ => peer_ip,
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    if !(trusted && headers.contains_key(&X_FORWARDED_PROTO)) {
        headers.insert(
            X_FORWARDED_PROTO.clone(),
            HeaderValue::from_static(if conn.tls { "https" } else { "http" }),
        );
    }
    if !(trusted && headers.contains_key(&X_FORWARDED_HOST)) {
        match host.and_then(|h| HeaderValue::from_str(h).ok()) {
            Some(h) => {
                headers.insert(X_FORWARDED_HOST.clone(), h);
            }
            None => {
                headers.remove(&X_FORWARDED_HOST);
            }
        }
    }
    if let Ok(v) = HeaderValue::from_str(request_id) {
        headers.insert(X_REQUEST_ID, v);
    }
}

/// A request ready to go upstream, and what forwarding needs to know about it.
pub struct Outgoing {
    pub service: Arc<ServiceRt>,
    pub req: Request<Body>,
    /// How far the client's body got (None: the request was whole when forwarded).
    pub progress: Option<Arc<BodyProgress>>,
    /// The upgrade being forwarded, and the client's side of it.
    pub(super) upgrade: Option<(Upgrade, hyper::upgrade::OnUpgrade)>,
    /// No Host from the client: each attempt sends its backend's own authority.
    pub host_per_backend: bool,
    /// No body and an idempotent method: can be sent again if the connection dies after it was
    /// written.
    pub replayable: bool,
    /// A gRPC request: HTTP/2 upstream only, within its deadline.
    pub grpc: Option<super::grpc::Grpc>,
    /// The pool the request goes to: the route's, or the split chosen for it.
    pub pool: Arc<crate::upstream::Pool>,
    /// The split chosen (index into `service.splits`), if the route has splits.
    pub split: Option<usize>,
}

/// Turns a routed client request into the request its backend gets.
pub fn prepare(
    snap: &Snapshot,
    routed: Routed,
    mut req: Request<Incoming>,
    identity: Option<&Identity>,
    conn: ConnInfo,
    vars: &super::header_rules::Vars,
    grpc: Option<super::grpc::Grpc>,
) -> Result<Outgoing, GatewayError> {
    let request_id = vars.request_id;
    let Routed {
        service,
        normalized,
        host,
    } = routed;
    let svc = &service;
    let upgrade = if is_upgrade(&req) {
        plan_upgrade(req.headers(), &svc.allowed_upgrades)?
    } else {
        None
    };
    let upgrade = upgrade.map(|u| (u, hyper::upgrade::on(&mut req)));
    // The backend gets the canonical host the request was routed by (rules::host), also for
    // HTTP/2, which carries it in `:authority`.
    let upstream_host = host
        .as_ref()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok());

    let (mut parts, body) = req.into_parts();
    parts.uri = upstream_uri(svc, std::mem::take(&mut parts.uri), normalized)?;
    parts.version = Version::HTTP_11;
    let scan = scan_headers(&parts.headers, &snap.identity_headers);
    // An upgrade the route does not allow loses Upgrade and `Connection: upgrade` here like any
    // hop-by-hop header, so the backend sees an ordinary request.
    if scan.hop != 0 || upgrade.is_some() {
        strip_hop_by_hop(&mut parts.headers, scan.hop, upgrade.is_some());
    }
    if let Some((u, _)) = &upgrade {
        // Only the allowed tokens the client offered go upstream.
        if let Ok(v) = HeaderValue::from_str(&u.tokens.join(", ")) {
            parts.headers.insert(header::UPGRADE, v);
        }
    }
    add_forwarded_headers(
        snap,
        &mut parts.headers,
        conn,
        // The canonical host without its port, as before canonicalisation existed.
        host.as_ref().map(|a| a.host()),
        request_id,
        scan.proxy,
    );
    // An API key never goes upstream, whichever route it was sent to.
    if let Some(k) = &snap.api_keys {
        parts.headers.remove(&k.header);
    }
    // Identity headers come from the gateway only: whatever the client sent is dropped, always.
    if scan.identity {
        for h in &snap.identity_headers {
            parts.headers.remove(h);
        }
    }
    if let Some(id) = identity {
        for (name, value) in &id.headers {
            parts.headers.insert(name.clone(), value.clone());
        }
        // A request let in by its API key carries no Authorization the gateway checked: none
        // goes upstream, so no backend reads claims from an unverified token.
        if id.key_id.is_some() || snap.auth.as_ref().is_some_and(|a| a.strip_authorization) {
            parts.headers.remove(header::AUTHORIZATION);
        }
    }
    // A request without a host (HTTP/1.0 without Host, HTTP/2 without `:authority` and
    // `host`) still needs one upstream (RFC 9112 3.2): the chosen backend's own authority, set
    // per attempt (nginx's default `proxy_set_header Host $proxy_host`).
    let host_per_backend = upstream_host.is_none();
    if let Some(h) = upstream_host {
        parts.headers.insert(header::HOST, h);
    }
    // HTTP/2 clients send one `cookie` field per cookie (RFC 9113 section 8.2.3); a backend
    // spoken to in HTTP/1.1 expects one Cookie line, so several are joined with "; ".
    if parts
        .headers
        .get_all(header::COOKIE)
        .iter()
        .nth(1)
        .is_some()
    {
        let joined: Vec<u8> = parts
            .headers
            .get_all(header::COOKIE)
            .iter()
            .map(HeaderValue::as_bytes)
            .collect::<Vec<_>>()
            .join(&b"; "[..]);
        if let Ok(v) = HeaderValue::from_bytes(&joined) {
            parts.headers.insert(header::COOKIE, v);
        }
    }
    // The route's header rules, after the gateway's own fields (which they cannot name).
    if !svc.request_rules.is_empty() {
        svc.request_rules.apply(&mut parts.headers, vars);
    }
    let (pool, split) = super::split::choose(&svc.splits, &svc.pool, &parts.headers);
    let replayable = parts.method.is_idempotent() && http_body::Body::is_end_stream(&body);
    // A body still to come is tracked, so a failure while the upstream waits on the client is
    // put down to the client; the body must also make progress every `headerRead` (nginx's
    // client_body_timeout), so a stalled upload gets its 408 in seconds, not at `request`.
    let (body, progress) = if http_body::Body::is_end_stream(&body) {
        (Body::Incoming(body), None)
    } else {
        let (b, p) = ClientBody::wrap(body, svc.max_body_size, svc.timeouts.header_read);
        (b, Some(p))
    };
    Ok(Outgoing {
        req: Request::from_parts(parts, body),
        service,
        progress,
        upgrade,
        host_per_backend,
        replayable,
        grpc,
        pool,
        split,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn websocket_accept_matches_rfc_6455() {
        // The worked example of RFC 6455 section 1.3.
        assert_eq!(
            websocket_accept(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn allowed_upgrades_admit_by_name_and_version() {
        assert!(admits("websocket", "websocket"));
        assert!(admits("foo", "foo/2"));
        assert!(admits("foo/2", "foo/2"));
        assert!(!admits("foo/2", "foo"));
        assert!(!admits("foo/2", "foo/3"));
        assert!(!admits("foo", "foobar"));
        let allowed = vec!["websocket".to_string()];
        let plan = plan_upgrade(&headers(&[("upgrade", "Foo, h2c")]), &allowed);
        assert!(
            matches!(plan, Ok(None)),
            "nothing allowed: forwarded as ordinary"
        );
    }

    #[test]
    fn only_a_101_that_completes_the_handshake_opens_a_tunnel() {
        let allowed = vec!["websocket".to_string(), "foo".to_string()];
        let req = headers(&[
            ("upgrade", "foo, WebSocket"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("sec-websocket-version", "13"),
        ]);
        let Ok(Some(up)) = plan_upgrade(&req, &allowed) else {
            panic!("a valid handshake is forwarded");
        };
        assert_eq!(up.tokens, ["foo", "websocket"]);
        let ok = |h: &[(&'static str, &'static str)]| check_switch(&headers(h), &up).is_ok();
        assert!(ok(&[
            ("upgrade", "websocket"),
            ("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
        ]));
        assert!(!ok(&[
            ("upgrade", "websocket"),
            ("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOp=")
        ]));
        assert!(!ok(&[("upgrade", "websocket")]));
        assert!(ok(&[("upgrade", "foo")]));
        assert!(!ok(&[("upgrade", "bar")]));
        assert!(!ok(&[]));
    }

    #[test]
    fn bad_websocket_handshakes_are_refused_with_a_reason() {
        let allowed = vec!["websocket".to_string()];
        for (key, version, reason) in [
            ("", "13", "Sec-WebSocket-Key"),
            ("dGhlIHNhbXBsZSBub25jZQ", "13", "Sec-WebSocket-Key"),
            ("AAAAAAAAAAAAAAAAAAAAAAAA", "13", "Sec-WebSocket-Key"),
            ("dGhlIHNhbXBsZSBub25jZQ==", "8", "Sec-WebSocket-Version"),
        ] {
            let mut h = headers(&[("upgrade", "websocket"), ("sec-websocket-version", version)]);
            if !key.is_empty() {
                h.insert("sec-websocket-key", HeaderValue::from_static(key));
            }
            match plan_upgrade(&h, &allowed) {
                Err(e @ GatewayError::BadRequest(_)) => {
                    assert!(e.to_string().contains(reason), "{key:?}/{version}: {e}")
                }
                Err(e) => panic!("{key:?}/{version}: {e}"),
                Ok(_) => panic!("{key:?}/{version} accepted"),
            }
        }
    }
}
