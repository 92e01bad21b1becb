//! `hexgate demo`: the gateway plus three built-in backends in one process, memory only.

use std::convert::Infallible;
use std::net::SocketAddr;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::body::Body;

/// The response field in which the demo backends echo the `X-Consumer-Id` they were sent.
pub const SAW_CONSUMER: http::HeaderName =
    http::HeaderName::from_static("x-backend-saw-consumer-id");

/// The demo's API key: fixed and printed in the walkthrough, so it is no secret. It only works
/// against `hexgate demo`, a local gateway of demo backends; never use a key like it elsewhere.
pub const DEMO_API_KEY: &str = "demo-key-free-0123456789";

/// The consumer the demo key belongs to.
pub const DEMO_CONSUMER: &str = "demo";

/// The demo's API key file: [`DEMO_API_KEY`] for consumer `demo` on the `free` plan (only its
/// SHA-256 is stored, as in a real key file).
pub fn api_key_file() -> String {
    format!(
        "# hexgate demo: the key is {DEMO_API_KEY} (a fixed key for this local demo only)\n\
         - id: demo-free-1\n  consumer: {DEMO_CONSUMER}\n  plan: free\n  scopes: [orders:read]\n  hash: \"{}\"\n",
        crate::auth::apikeys::hash_of(DEMO_API_KEY)
    )
}

/// Writes [`api_key_file`] as `keys/apikeys.yaml`, beside the demo's key pair (the directory
/// is removed with them when the demo stops).
pub fn write_api_key_file(keys: &std::path::Path) -> std::io::Result<()> {
    std::fs::write(keys.join("apikeys.yaml"), api_key_file())
}

/// A tiny backend: "Hello from Backend (Port N)" on every path, 200 on /health; a request
/// that came with `X-Consumer-Id` is answered with it in [`SAW_CONSUMER`].
pub async fn serve_hello(listener: TcpListener) {
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| async move {
                let body = if req.uri().path() == "/health" {
                    "OK\n".to_string()
                } else {
                    format!("Hello from Backend (Port {port})\n")
                };
                let mut r = Response::new(Body::full(body));
                *r.status_mut() = StatusCode::OK;
                // What the gateway told the backend about the caller, so `curl -i` shows it.
                if let Some(c) = req.headers().get("x-consumer-id") {
                    r.headers_mut().insert(SAW_CONSUMER, c.clone());
                }
                Ok::<_, Infallible>(r)
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// The demo's configuration, in the same YAML a user would write. `keys` is the directory
/// holding the demo's freshly generated key pair and its API key file ([`write_api_key_file`]).
pub fn config_yaml(port: u16, admin_port: u16, backend_ports: [u16; 3], keys: &str) -> String {
    let [a, b, c] = backend_ports;
    format!(
        r#"gatewayPort: "{port}"
gatewayBind: 127.0.0.1
adminPort: "{admin_port}"
healthCheckInterval: 5
authentication:
  enabled: true
  publicKeyPath: "{keys}/public.pem"
  defaultPlan: free
apiKeys:
  header: X-Api-Key
  file: "{keys}/apikeys.yaml"
plans:
  free: {{quota: {{limit: 5, period: 1h}}}}
services:
  - name: "user-service"
    path: "/users/"
    backends: ["http://127.0.0.1:{a}", "http://127.0.0.1:{b}"]
    plans: false
    rateLimiting: {{enabled: true, ratePerSecond: 1, burst: 3, key: consumer}}
    quota: {{enabled: true, limit: 100, period: "1h"}}
  - name: "order-service"
    path: "/orders/"
    authentication: {{enabled: true, methods: [jwt, apiKey]}}
    backends: ["http://127.0.0.1:{c}"]
  - name: "product-service"
    path: "/products/"
    authentication: {{enabled: false}}
    backends: ["http://127.0.0.1:{c}"]
"#
    )
}

/// Binds the three demo backends on loopback.
pub async fn start_backends(ports: [u16; 3]) -> std::io::Result<()> {
    for p in ports {
        let addr = SocketAddr::from(([127, 0, 0, 1], p));
        let l = TcpListener::bind(addr)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("demo backend on {addr}: {e}")))?;
        tokio::spawn(serve_hello(l));
    }
    Ok(())
}

pub fn banner(
    port: u16,
    admin_port: u16,
    backend_ports: [u16; 3],
    keys: &str,
    token: &str,
) -> String {
    let [a, b, c] = backend_ports;
    let (key, consumer, saw) = (DEMO_API_KEY, DEMO_CONSUMER, "X-Backend-Saw-Consumer-Id");
    format!(
        r#"HexGate demo is running (memory only, no Redis or Consul needed).
  gateway  http://localhost:{port}
  admin    http://localhost:{admin_port}  (/metrics, /admin/upstreams, /admin/config, /admin/quotas)
  backends user-service on {a} and {b} (JWT required, 1 request/s with a burst of 3 per consumer,
           100 per hour), order-service on {c} (JWT or API key, free plan: 5 per hour per
           consumer), product-service on {c} (public)
  keys     {keys}/private.pem and public.pem, apikeys.yaml (made for this demo)

Try, in another terminal:
  curl http://localhost:{port}/products/abc     # Hello from Backend (Port {c})
  curl http://localhost:{port}/users/1          # 401 Unauthorized: Missing Authorization header

  export TOKEN={token}
  # (or make one: TOKEN=$(hexgate token --key {keys}/private.pem --sub alice))
  curl -H "Authorization: Bearer $TOKEN" http://localhost:{port}/users/1   # Port {a}
  curl -H "Authorization: Bearer $TOKEN" http://localhost:{port}/users/2   # Port {b} (round robin)

  # four rapid requests: 200, 200, 200, then 429 Too Many Requests
  # (1 request/s, burst 3, per consumer: wait a few seconds after the two calls above)
  for i in 1 2 3 4; do curl -s -o /dev/null -w "%{{http_code}}\n" -H "Authorization: Bearer $TOKEN" http://localhost:{port}/users/$i; done

  curl -i http://localhost:{port}/nowhere       # 404 with a JSON reason
  curl http://localhost:{admin_port}/admin/upstreams
  curl -s http://localhost:{admin_port}/metrics | grep hexgate_http_requests_total

  # API keys and plans: the demo key (fixed, for this local demo only) is consumer "{consumer}"
  # on the free plan, 5 requests per hour on order-service
  export KEY={key}
  curl -i -H "X-Api-Key: $KEY" http://localhost:{port}/orders/1   # 200, {saw}: {consumer}
  for i in $(seq 2 6); do curl -s -o /dev/null -w "%{{http_code}}\n" -H "X-Api-Key: $KEY" http://localhost:{port}/orders/$i; done
  # 200 200 200 200 429: the plan's 5 per hour are used up

  # the quota ledger on the admin port: used 5 of 5, remaining 0, seconds until one frees up
  curl -s "http://localhost:{admin_port}/admin/quotas?consumer={consumer}"
  curl -s -X POST "http://localhost:{admin_port}/admin/quotas/credit?consumer={consumer}&scope=plan&amount=2"   # 2 more
  curl -s -X DELETE "http://localhost:{admin_port}/admin/quotas?consumer={consumer}&scope=plan"   # reset: used 0

Press Ctrl+C to stop.
"#
    )
}
