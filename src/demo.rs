//! `hexgate demo`: the gateway plus three built-in backends in one process, memory only.

use std::convert::Infallible;
use std::net::SocketAddr;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::body::Body;

/// A tiny backend: "Hello from Backend (Port N)" on every path, 200 on /health.
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
                Ok::<_, Infallible>(r)
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// The demo's configuration, in the same YAML a user would write. `keys` is the directory
/// holding the demo's freshly generated key pair.
pub fn config_yaml(port: u16, admin_port: u16, backend_ports: [u16; 3], keys: &str) -> String {
    let [a, b, c] = backend_ports;
    format!(
        r#"gatewayPort: "{port}"
adminPort: "{admin_port}"
healthCheckInterval: 5
authentication:
  enabled: true
  publicKeyPath: "{keys}/public.pem"
services:
  - name: "user-service"
    path: "/users/"
    backends: ["http://127.0.0.1:{a}", "http://127.0.0.1:{b}"]
    rateLimiting: {{enabled: true, ratePerSecond: 1, burst: 3, key: consumer}}
    quota: {{enabled: true, limit: 100, period: "1h"}}
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
    format!(
        r#"HexGate demo is running (memory only, no Redis or Consul needed).
  gateway  http://localhost:{port}
  admin    http://localhost:{admin_port}  (/metrics, /admin/upstreams, /admin/config)
  backends user-service on {a} and {b} (JWT required, 1 request/s with a burst of 3 per consumer,
           100 per hour), product-service on {c} (public)
  keys     {keys}/private.pem and public.pem (made for this demo)

Try, in another terminal:
  curl http://localhost:{port}/products/abc     # Hello from Backend (Port {c})
  curl http://localhost:{port}/users/1          # 401 Unauthorized: Missing Authorization header

  export TOKEN={token}
  # (or make one: TOKEN=$(hexgate token --key {keys}/private.pem --sub alice))
  curl -H "Authorization: Bearer $TOKEN" http://localhost:{port}/users/1   # Port {a}
  curl -H "Authorization: Bearer $TOKEN" http://localhost:{port}/users/2   # Port {b} (round robin)

  # four rapid requests: 200, 200, 200, then 429 Too Many Requests
  for i in 1 2 3 4; do curl -s -o /dev/null -w "%{{http_code}}\n" -H "Authorization: Bearer $TOKEN" http://localhost:{port}/users/$i; done

  curl -i http://localhost:{port}/nowhere       # 404 with a JSON reason
  curl http://localhost:{admin_port}/admin/upstreams
  curl -s http://localhost:{admin_port}/metrics | grep hexgate_http_requests_total

Press Ctrl+C to stop.
"#
    )
}
