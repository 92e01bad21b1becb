//! The admin listener (never the public port): /healthz, /readyz, /metrics, /admin/config,
//! /admin/upstreams.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::body::Body;
use crate::state::State;

pub async fn serve(state: Arc<State>, listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move {
                    if req.uri().path() == "/admin/sd" {
                        return Ok::<_, Infallible>(service_discovery(&state, &req).await);
                    }
                    Ok::<_, Infallible>(handle(&state, req))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
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
        "/metrics" => text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            {
                let mut out = state.metrics.render(&snap.health());
                state.discovery.render(&mut out);
                out
            },
        ),
        "/admin/config" => json(serde_json::json!({
            "generation": snap.generation,
            "config": &*snap.config,
        })),
        "/admin/upstreams" => {
            let services: Vec<_> = snap
                .services
                .iter()
                .map(|s| {
                    let members = s.pool.members();
                    let backends: Vec<_> = members
                        .backends
                        .iter()
                        .enumerate()
                        .map(|(i, b)| {
                            serde_json::json!({
                                "address": b.addr.to_string(),
                                "healthy": b.is_healthy(),
                                "inFlight": b.in_flight.load(Ordering::Relaxed),
                                "idleConnections": b.idle_count(),
                                "source": if i < members.static_count { "static" } else { "consul" },
                            })
                        })
                        .collect();
                    serde_json::json!({ "service": s.name, "backends": backends })
                })
                .collect();
            json(serde_json::json!({ "generation": snap.generation, "services": services }))
        }
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}
