//! The admin listener (never the public port): /healthz, /readyz, /metrics, /admin/config,
//! /admin/upstreams, /admin/sd.
//!
//! It gets the public listener's protections: the header read timeout (`timeouts.headerRead`),
//! the keep-alive idle timeout (`timeouts.idle`), `maxHeaderSize` and `maxHeaderCount` (hyper's
//! buffer and field limits, then the same [`HeaderPolicy`](crate::rules::headers::HeaderPolicy) as the public port), and at most
//! [`MAX_CONNECTIONS`] connections at a time: a permit is taken before `accept`, so excess
//! connections wait in the kernel's backlog and cost no task. With an admin token (`adminToken`,
//! `adminTokenFile` or `HEXGATE_ADMIN_TOKEN`), every path but /healthz and /readyz needs
//! `Authorization: Bearer <token>`; anything else gets 401.
//!
//! So that clients who can reach the port but lack the token cannot hold those connections:
//!
//! - with a token configured, every response to a request that did not present the valid token
//!   (401s, header errors, and /healthz and /readyz asked without it) carries `Connection: close`
//!   and the connection ends after it; only authenticated connections are kept alive (Prometheus
//!   reuses its scrape connection);
//! - one peer address holds at most [`MAX_CONNECTIONS_PER_PEER`] admin connections at a time;
//!   a connection over that is closed as soon as it is accepted, without a response. Loopback is
//!   an address like any other: a local Prometheus and a local health checker share 127.0.0.1's
//!   allowance (the same holds for all clients behind one NAT address).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::body::Body;
use crate::state::State;

/// Most admin connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 256;

/// Most admin connections one peer address holds at once; more are closed when accepted.
pub const MAX_CONNECTIONS_PER_PEER: usize = 32;

/// `WWW-Authenticate` of a 401 from the admin listener.
pub const WWW_AUTHENTICATE: &str = "Bearer realm=\"hexgate-admin\"";

pub async fn serve(state: Arc<State>, listener: TcpListener) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let peers = Arc::new(PeerSlots::default());
    loop {
        // The permit first: at the cap, nothing is accepted (no task, no buffers) until a
        // connection ends.
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Over the per-peer cap: closed here, without a response, and the permit goes back at
        // once. Logged at debug only, so a flood does not flood the log too.
        let Some(slot) = peers.try_take(peer.ip()) else {
            tracing::debug!(peer = %peer.ip(), "admin connection over the per-peer cap closed");
            drop(stream);
            drop(permit);
            continue;
        };
        // Built per connection from the current config, so a reload's limits apply to new
        // connections.
        let builder = crate::listen::http1_builder(&state.snapshot.load().settings.http1);
        let state = state.clone();
        tokio::spawn(async move {
            // Boxed per request, as on the public listeners: an idle keep-alive connection
            // then holds no request-sized future in hyper's slot.
            let svc = service_fn(move |req| {
                let state = state.clone();
                let fut: std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>> =
                    Box::pin(async move { Ok::<_, Infallible>(respond(&state, req, peer).await) });
                fut
            });
            if let Err(e) = builder.serve_connection(TokioIo::new(stream), svc).await {
                tracing::debug!(error = %e, "admin connection ended with error");
            }
            drop(slot);
            drop(permit);
        });
    }
}

/// Open admin connections per peer address (IPv4-mapped IPv6 addresses count as the IPv4
/// address); an entry is removed when its last connection ends, so the table only holds
/// addresses with a connection open (at most [`MAX_CONNECTIONS`]).
#[derive(Default)]
struct PeerSlots {
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// What the per-peer cap counts by: an IPv4 address (IPv4-mapped IPv6 included), or an IPv6
/// /64, the block one host usually holds whole.
fn peer_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(std::net::Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

impl PeerSlots {
    /// One more connection for `ip`, or None when it already holds
    /// [`MAX_CONNECTIONS_PER_PEER`]. The slot is given back when the returned guard drops.
    fn try_take(self: &Arc<Self>, ip: IpAddr) -> Option<PeerSlot> {
        let ip = peer_key(ip);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= MAX_CONNECTIONS_PER_PEER {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            peers: self.clone(),
            ip,
        })
    }
}

/// One connection's place in [`PeerSlots`].
struct PeerSlot {
    peers: Arc<PeerSlots>,
    ip: IpAddr,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self.peers.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// One admin request: header policy, then the token, then the endpoint. With a token
/// configured, a request that did not present it is answered with `Connection: close`, and hyper
/// ends the connection after that response: only authenticated clients keep connections open.
async fn respond(
    state: &State,
    mut req: Request<Incoming>,
    peer: std::net::SocketAddr,
) -> Response<Body> {
    let snap = state.snapshot.load_full();
    let guarded = snap.admin_token.is_some();
    if let Err(e) = snap.settings.header_policy.apply(req.headers_mut()) {
        let status = if e.is_too_large() {
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        } else {
            StatusCode::BAD_REQUEST
        };
        let r = text(status, "text/plain", format!("{e}\n"));
        return if guarded { closing(r) } else { r };
    }
    // Checked on every path, the exempt ones too: a health checker that sends the token may
    // keep its connection.
    let auth = snap
        .admin_token
        .as_deref()
        .map(|token| check_bearer(req.headers(), token));
    drop(snap);
    let path = req.uri().path();
    let exempt = path == "/healthz" || path == "/readyz";
    let r = match auth {
        Some(Err(reason)) if !exempt => {
            let mut r = text(
                StatusCode::UNAUTHORIZED,
                "text/plain",
                format!("{reason}\n"),
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(WWW_AUTHENTICATE),
            );
            r
        }
        _ if path == "/admin/sd" => service_discovery(state, &req).await,
        _ if path == "/admin/quotas" || path == "/admin/quotas/credit" => {
            // Who asked, for the audit log: the admin token (there is one; no fingerprint of
            // it, which would let a reader of the logs test guesses at it offline), or none (a
            // loopback-only admin listener), and the peer address.
            let who = match &auth {
                Some(Ok(())) => format!("admin token from {}", peer.ip()),
                _ => format!("no admin token, from {}", peer.ip()),
            };
            let (status, body) =
                crate::ledger::handle(state, req.method(), path, req.uri().query(), &who).await;
            let mut r = json(body);
            *r.status_mut() = status;
            if status == StatusCode::METHOD_NOT_ALLOWED {
                let allow = if path == "/admin/quotas" {
                    "GET, HEAD, DELETE"
                } else {
                    "POST"
                };
                r.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            r
        }
        _ => handle(state, req),
    };
    match auth {
        Some(Err(_)) => closing(r),
        _ => r,
    }
}

/// `r` with `Connection: close`: hyper closes the connection once it is written.
fn closing(mut r: Response<Body>) -> Response<Body> {
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// Checks `Authorization: Bearer <token>` against the admin token; the reason when it fails.
fn check_bearer(headers: &HeaderMap, token: &str) -> Result<(), &'static str> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err("admin token required: send Authorization: Bearer <token>");
    };
    let value = value.as_bytes();
    let presented = match value.iter().position(|b| *b == b' ') {
        Some(i) if value[..i].eq_ignore_ascii_case(b"bearer") => value[i + 1..].trim_ascii(),
        _ => return Err("admin token required: Authorization must use the Bearer scheme"),
    };
    if token_eq(presented, token.as_bytes()) {
        Ok(())
    } else {
        Err("invalid admin token")
    }
}

/// Constant-time comparison: both sides are hashed first, so neither the time taken nor an
/// early exit says how much of the token matched, or how long it is.
fn token_eq(presented: &[u8], expected: &[u8]) -> bool {
    use ring::digest::{digest, SHA256};
    let a = digest(&SHA256, presented);
    let b = digest(&SHA256, expected);
    a.as_ref()
        .iter()
        .zip(b.as_ref())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut r = Response::new(Body::full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn json(value: serde_json::Value) -> Response<Body> {
    text(
        StatusCode::OK,
        "application/json",
        serde_json::to_string_pretty(&value).unwrap_or_default(),
    )
}

/// The exposition format a scraper asked for in `Accept`: OpenMetrics when it lists
/// `application/openmetrics-text` (any version: we write 1.0.0, which 0.0.1 readers take) with
/// a q above 0 and at least the text format's, else the text format (also when nothing listed
/// is acceptable: a scrape is better answered than refused). The text format's q is that of
/// the most specific range naming it: `text/plain`, else `text/*`, else `*/*`. Prometheus
/// sends `application/openmetrics-text;version=1.0.0,...,text/plain;version=0.0.4;q=0.5,...`.
fn metrics_format(headers: &HeaderMap) -> crate::metrics::Format {
    // Highest q seen for OpenMetrics, and for text/plain, text/* and */*.
    let (mut om, mut plain, mut text_any, mut any) = (None, None, None, None);
    let ranges = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','));
    for range in ranges {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        // A q that does not parse counts as 1 (the range was listed to be accepted).
        let q = parts
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
            .map_or(1.0, |(_, v)| v.trim().parse::<f32>().unwrap_or(1.0))
            .clamp(0.0, 1.0);
        let slot = match media.as_str() {
            "application/openmetrics-text" => &mut om,
            "text/plain" => &mut plain,
            "text/*" => &mut text_any,
            "*/*" => &mut any,
            _ => continue,
        };
        *slot = Some(slot.map_or(q, |old: f32| old.max(q)));
    }
    let text = plain.or(text_any).or(any).unwrap_or(0.0);
    match om {
        Some(q) if q > 0.0 && q >= text => crate::metrics::Format::OpenMetrics,
        _ => crate::metrics::Format::Text,
    }
}

/// `hexgate_load_shed_total{service,plan}`: requests `maxInFlight` refused, by plan (`plan=""`
/// for requests without one), for the routes that set it. The counters live with the route
/// (a reload starts them again, as Prometheus' counter resets allow).
fn render_load_shed(
    snap: &crate::snapshot::Snapshot,
    out: &mut String,
    format: crate::metrics::Format,
) {
    use crate::metrics::{write_header, Kind};
    use std::fmt::Write as _;
    let routes: Vec<_> = snap
        .services
        .iter()
        .filter_map(|s| s.in_flight.as_ref().map(|f| (s, f)))
        .collect();
    if routes.is_empty() {
        return;
    }
    write_header(
        out,
        format,
        "hexgate_load_shed_total",
        Kind::Counter,
        "Requests refused by maxInFlight, by plan.",
    );
    for (s, f) in &routes {
        for (plan, n) in f.shed() {
            let _ = writeln!(
                out,
                "hexgate_load_shed_total{{service=\"{}\",plan=\"{}\"}} {n}",
                crate::metrics::escape_label(&s.name),
                crate::metrics::escape_label(plan.unwrap_or(""))
            );
        }
    }
    write_header(
        out,
        format,
        "hexgate_in_flight_requests",
        Kind::Gauge,
        "Requests in flight on routes with maxInFlight.",
    );
    for (s, f) in &routes {
        let _ = writeln!(
            out,
            "hexgate_in_flight_requests{{service=\"{}\"}} {}",
            crate::metrics::escape_label(&s.name),
            f.in_flight()
        );
    }
}

/// Prometheus HTTP service discovery fed by Consul: the passing instances of `?service=` (default
/// `hexgate`), for Prometheus builds without consul_sd_configs.
async fn service_discovery(state: &State, req: &Request<Incoming>) -> Response<Body> {
    let Some(client) = state.discovery.client() else {
        return text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "no Consul configured for this instance\n".into(),
        );
    };
    let service = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("service=")))
        .filter(|s| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
        .unwrap_or("hexgate");
    match client
        .health_service(service, &[], None, 0, std::time::Duration::from_secs(5))
        .await
    {
        Ok((instances, _)) => {
            let targets: Vec<String> = instances.iter().map(|i| i.addr.authority()).collect();
            json(
                serde_json::json!([{ "targets": targets, "labels": { "consul_service": service } }]),
            )
        }
        Err(e) => text(StatusCode::BAD_GATEWAY, "text/plain", format!("{e}\n")),
    }
}

pub fn handle(state: &State, req: Request<Incoming>) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n".into(),
        );
    }
    let snap = state.snapshot.load_full();
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => {
            if !state.discovery.synced() {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "not ready: waiting for the first answer from Consul\n".into(),
                )
            } else if snap.router.is_empty() {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "not ready: no routes configured\n".into(),
                )
            } else {
                text(StatusCode::OK, "text/plain", "ready\n".into())
            }
        }
        "/metrics" => {
            let format = metrics_format(req.headers());
            let mut out = String::with_capacity(16 * 1024);
            state
                .metrics
                .render_families(&mut out, &snap.health(), format);
            state
                .discovery
                .render(&mut out, format == crate::metrics::Format::OpenMetrics);
            render_load_shed(&snap, &mut out, format);
            format.finish(&mut out);
            let mut r = text(StatusCode::OK, format.content_type(), out);
            // The body depends on Accept: caches must not hand one format to the other.
            r.headers_mut()
                .insert(header::VARY, HeaderValue::from_static("accept"));
            r
        }
        "/admin/config" => json(serde_json::json!({
            "generation": snap.generation,
            "config": &snap.settings.shown,
        })),
        "/admin/upstreams" => {
            // A pool's backends: health (`circuitBreaker` true while a circuit breaker's
            // ejection is in force), load, pooled connections, where the address came from.
            let backends = |pool: &crate::upstream::Pool| -> Vec<serde_json::Value> {
                let members = pool.members();
                members
                    .backends
                    .iter()
                    .enumerate()
                    .map(|(i, b)| {
                        serde_json::json!({
                            "address": b.addr.to_string(),
                            "healthy": b.is_healthy(),
                            "circuitBreaker": b.breaker_ejected(),
                            "inFlight": b.in_flight.load(Ordering::Relaxed),
                            "idleConnections": b.idle_count(),
                            "source": if i < members.static_count { "static" } else { "consul" },
                        })
                    })
                    .collect()
            };
            let services: Vec<_> = snap
                .services
                .iter()
                .map(|s| {
                    let mut v =
                        serde_json::json!({ "service": s.name, "backends": backends(&s.pool) });
                    if !s.splits.is_empty() {
                        v["splits"] = s
                            .splits
                            .iter()
                            .map(|sp| {
                                serde_json::json!({
                                    "split": sp.name,
                                    "weight": sp.weight,
                                    "backends": backends(&sp.pool),
                                })
                            })
                            .collect();
                    }
                    v
                })
                .collect();
            json(serde_json::json!({ "generation": snap.generation, "services": services }))
        }
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_peers_count_by_64_block() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            peer_key(ip("2001:db8:1:2::1")),
            peer_key(ip("2001:db8:1:2:ffff::9"))
        );
        assert_ne!(
            peer_key(ip("2001:db8:1:2::1")),
            peer_key(ip("2001:db8:1:3::1"))
        );
        assert_eq!(peer_key(ip("::ffff:127.0.0.2")), ip("127.0.0.2"));
        assert_ne!(peer_key(ip("127.0.0.2")), peer_key(ip("127.0.0.3")));
    }

    #[test]
    fn metrics_format_follows_accept() {
        use crate::metrics::Format::{OpenMetrics, Text};
        let format = |accept: &[&str]| {
            let mut h = HeaderMap::new();
            for a in accept {
                h.append(header::ACCEPT, HeaderValue::from_str(a).unwrap());
            }
            metrics_format(&h)
        };
        // What Prometheus sends by default, and with scrape_protocols set to the text format.
        const PROMETHEUS: &str = "application/openmetrics-text;version=1.0.0,\
            application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,\
            */*;q=0.1";
        assert_eq!(format(&[PROMETHEUS]), OpenMetrics);
        assert_eq!(format(&["text/plain;version=0.0.4;q=1,*/*;q=0.1"]), Text);
        assert_eq!(format(&[]), Text);
        assert_eq!(format(&["*/*"]), Text);
        assert_eq!(format(&["text/plain"]), Text);
        assert_eq!(format(&["Application/OpenMetrics-Text"]), OpenMetrics);
        assert_eq!(
            format(&["text/html", "application/openmetrics-text"]),
            OpenMetrics
        );
        // q=0: not acceptable, whatever else is listed.
        assert_eq!(format(&["application/openmetrics-text;q=0"]), Text);
        assert_eq!(
            format(&["application/openmetrics-text; Q=0.0, */*;q=0.1"]),
            Text
        );
        // The highest q wins; the most specific range sets the text format's q.
        assert_eq!(
            format(&["text/plain;q=0.9,application/openmetrics-text;q=0.5"]),
            Text
        );
        assert_eq!(
            format(&["text/plain;q=0.4,application/openmetrics-text;q=0.5"]),
            OpenMetrics
        );
        assert_eq!(
            format(&["text/plain;q=0,*/*,application/openmetrics-text;q=0.2"]),
            OpenMetrics
        );
        assert_eq!(
            format(&["text/*;q=0.3,*/*,application/openmetrics-text;q=0.2"]),
            Text
        );
        assert_eq!(
            format(&["application/openmetrics-text;q=0.5, text/plain;q=0.5"]),
            OpenMetrics
        );
        // Two OpenMetrics ranges: the higher q counts.
        assert_eq!(
            format(&[
                "application/openmetrics-text;version=9;q=0,application/openmetrics-text;q=0.8"
            ]),
            OpenMetrics
        );
    }
}
