//! TLS on the gateway (rustls, ALPN h2) and the plain port's redirect, checked with curl.

use std::process::Command;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_h2_and_plain_port_redirects() {
    require_tool("openssl");
    require_tool("curl");
    let b = TestBackend::start(Behaviour::Hello).await;
    let dir = temp_dir("tls");
    self_signed_cert(&dir, "");
    let https_port = free_port();
    let yaml = format!(
        "gatewayPort: \"{{port}}\"\ngatewayBind: 127.0.0.1\nadminPort: \"{{admin}}\"\ntls:\n  enabled: true\n  httpsPort: \"{https_port}\"\n  certFile: \"{{dir}}/cert.pem\"\n  keyFile: \"{{dir}}/key.pem\"\nservices:\n  - name: s\n    path: /users/\n    backends: [\"{}\"]\n",
        b.url()
    );
    let gw = Gateway::start_in(dir.clone(), &yaml).await;

    let out = Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(dir.join("cert.pem"))
        .args([
            "-w",
            "\n%{http_code} %{http_version}",
            &format!("https://localhost:{https_port}/users/1"),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("Hello from Backend (Port {})", b.addr.port())),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.ends_with("200 2"), "HTTP/2 over ALPN: {text}");

    let out = Command::new("curl")
        .args(["-sS", "--http1.1", "--cacert"])
        .arg(dir.join("cert.pem"))
        .args([
            "-w",
            "%{http_code} %{http_version}",
            "-o",
            "/dev/null",
            &format!("https://localhost:{https_port}/users/1"),
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200 1.1");

    let (s, h, _) = request(
        gw.port,
        http::Request::get("/users/1?a=b")
            .header("host", "localhost:8000")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(s, 301);
    assert_eq!(
        h["location"],
        format!("https://localhost:{https_port}/users/1?a=b").as_str()
    );
}
