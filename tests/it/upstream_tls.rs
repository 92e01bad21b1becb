//! TLS, HTTP/2 and h2c to backends (issue 14) against a real nginx: a test PKI made with the
//! `openssl` CLI (server CA, client CA, an unrelated CA, an expired server certificate), nginx
//! asking for a client certificate and reporting what it saw (`$ssl_client_s_dn`,
//! `$ssl_client_verify`, `$server_protocol`), and the real `hexgate` binary in between.
//! Every client call is bounded well under 10 s, so a stuck handshake fails instead of hanging.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

/// The longest any single client call (request, metrics scrape) may take.
const CLIENT_LIMIT: Duration = Duration::from_secs(5);

// ---- The PKI ----

/// Certificates and keys made with the openssl CLI in one directory:
/// - `ca.pem`: the backends' CA; `server.pem`/`server-key.pem`: `backend.test` and 127.0.0.1 by it;
///   `expired.pem`: the same name and key by the same CA, valid only in January 2020;
/// - `client-ca.pem`: the CA nginx trusts for clients; `client.pem`/`client-key.pem`: CN=hexgate-gw;
/// - `other-ca.pem`: an unrelated CA; `other-client.pem`/`other-client-key.pem`: CN=hexgate-gw by it.
struct Pki {
    dir: PathBuf,
}

const PKI_CNF: &str = "\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:backend.test, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[ca]
default_ca = past_ca
[past_ca]
database = index.txt
serial = serial
new_certs_dir = .
certificate = ca.pem
private_key = ca-key.pem
default_md = sha256
policy = any_policy
copy_extensions = none
unique_subject = no
[any_policy]
commonName = supplied
";

/// Fails the test, naming the setup script, when a command-line tool is missing.
fn need(tool: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "`{tool}` is not installed: run `bash scripts/setup.sh` (or `make setup`) first"
    );
}

/// Runs `openssl ARGS` in `dir`, failing the test with openssl's stderr.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Pki {
    fn make(dir: &Path) -> Pki {
        need("openssl");
        std::fs::write(dir.join("pki.cnf"), PKI_CNF).unwrap();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-config",
            "pki.cnf",
        ];
        let ca = |stem: &str, cn: &str| {
            let subj = format!("/CN={cn}");
            let (key, cert) = (format!("{stem}-key.pem"), format!("{stem}.pem"));
            let mut args = vec!["req", "-x509"];
            args.extend(ec);
            args.extend([
                "-extensions",
                "ca_ext",
                "-days",
                "2",
                "-subj",
                &subj,
                "-keyout",
                &key,
                "-out",
                &cert,
            ]);
            openssl(dir, &args);
        };
        let csr = |stem: &str, cn: &str| {
            let subj = format!("/CN={cn}");
            let (key, req) = (format!("{stem}-key.pem"), format!("{stem}.csr"));
            let mut args = vec!["req", "-new"];
            args.extend(ec);
            args.extend(["-subj", &subj, "-keyout", &key, "-out", &req]);
            openssl(dir, &args);
        };
        let sign = |stem: &str, ca: &str, ext: &str, serial: &str| {
            let (req, cert) = (format!("{stem}.csr"), format!("{stem}.pem"));
            let (ca_cert, ca_key) = (format!("{ca}.pem"), format!("{ca}-key.pem"));
            openssl(
                dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &req,
                    "-CA",
                    &ca_cert,
                    "-CAkey",
                    &ca_key,
                    "-set_serial",
                    serial,
                    "-days",
                    "2",
                    "-extfile",
                    "pki.cnf",
                    "-extensions",
                    ext,
                    "-out",
                    &cert,
                ],
            );
        };
        ca("ca", "HexGate Test Backend CA");
        ca("client-ca", "HexGate Test Client CA");
        ca("other-ca", "Unrelated Test CA");
        csr("server", "backend.test");
        sign("server", "ca", "server_ext", "4097");
        csr("client", "hexgate-gw");
        sign("client", "client-ca", "client_ext", "4098");
        csr("other-client", "hexgate-gw");
        sign("other-client", "other-ca", "client_ext", "4099");
        // `openssl ca` takes explicit validity dates (OpenSSL 3.0's `x509 -req` does not).
        std::fs::write(dir.join("index.txt"), "").unwrap();
        std::fs::write(dir.join("serial"), "1000\n").unwrap();
        openssl(
            dir,
            &[
                "ca",
                "-batch",
                "-config",
                "pki.cnf",
                "-startdate",
                "20200101000000Z",
                "-enddate",
                "20200102000000Z",
                "-extfile",
                "pki.cnf",
                "-extensions",
                "server_ext",
                "-notext",
                "-in",
                "server.csr",
                "-out",
                "expired.pem",
            ],
        );
        Pki {
            dir: dir.to_path_buf(),
        }
    }

    /// The absolute path of one of the files, quoted for YAML.
    fn q(&self, name: &str) -> String {
        let p = self.dir.join(name);
        assert!(p.exists(), "{} missing", p.display());
        format!("\"{}\"", p.display())
    }

    /// The right settings for the mTLS nginx: its CA, its name, our client certificate.
    fn good(&self) -> String {
        upstream_tls(&[
            ("caFile", self.q("ca.pem")),
            ("serverName", "backend.test".into()),
            ("certFile", self.q("client.pem")),
            ("keyFile", self.q("client-key.pem")),
        ])
    }
}

/// A service's `upstreamTls` block with these keys (values already YAML).
fn upstream_tls(fields: &[(&str, String)]) -> String {
    let mut s = String::from("    upstreamTls:\n");
    for (k, v) in fields {
        s.push_str(&format!("      {k}: {v}\n"));
    }
    s
}

// ---- nginx ----

/// A real nginx (one process: `master_process off`) on loopback ports, killed by pid on drop.
struct Nginx {
    child: Child,
    dir: PathBuf,
    pki: Pki,
    /// TLS with `server.pem`, client certificate required (from `client-ca.pem`), ALPN h2 and
    /// http/1.1. Several ports of the same server, so tests can give services distinct backends.
    mtls: [u16; 4],
    /// TLS with `expired.pem`, no client certificate asked.
    expired: u16,
    /// Cleartext HTTP/2 with prior knowledge (h2c).
    h2c: u16,
}

/// What every location answers: what nginx saw of the connection and request.
const REPORT: &str = "protocol=$server_protocol dn=$ssl_client_s_dn verify=$ssl_client_verify sni=$ssl_server_name uri=$request_uri\\n";

impl Nginx {
    fn start(name: &str) -> Nginx {
        need("nginx");
        let dir = temp_dir(&format!("nginx-{name}"));
        let pki = Pki::make(&dir);
        let mtls = [free_port(), free_port(), free_port(), free_port()];
        let (expired, h2c) = (free_port(), free_port());
        let d = dir.display();
        let listen = mtls
            .iter()
            .map(|p| format!("    listen 127.0.0.1:{p} ssl http2;\n"))
            .collect::<String>();
        let conf = format!(
            "daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 256; }}
http {{
  log_format report '$server_port $server_protocol $request_method $request_uri $status dn=\"$ssl_client_s_dn\" verify=$ssl_client_verify sni=$ssl_server_name ua=\"$http_user_agent\"';
  access_log {d}/access.log report;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  default_type text/plain;
  ssl_protocols TLSv1.2 TLSv1.3;
  server {{
{listen}    ssl_certificate {d}/server.pem;
    ssl_certificate_key {d}/server-key.pem;
    ssl_client_certificate {d}/client-ca.pem;
    ssl_verify_client on;
    location / {{
      add_header x-proto $server_protocol always;
      add_header x-client-dn $ssl_client_s_dn always;
      add_header x-client-verify $ssl_client_verify always;
      return 200 \"{REPORT}\";
    }}
  }}
  server {{
    listen 127.0.0.1:{expired} ssl http2;
    ssl_certificate {d}/expired.pem;
    ssl_certificate_key {d}/server-key.pem;
    location / {{ return 200 \"{REPORT}\"; }}
  }}
  server {{
    listen 127.0.0.1:{h2c} http2;
    location / {{ add_header x-proto $server_protocol always; return 200 \"{REPORT}\"; }}
  }}
}}
"
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let stderr = std::fs::File::create(dir.join("nginx.stderr")).unwrap();
        let child = Command::new("nginx")
            .arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start nginx");
        let mut n = Nginx {
            child,
            dir,
            pki,
            mtls,
            expired,
            h2c,
        };
        n.wait_listening();
        n
    }

    fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let ports: Vec<u16> = self
            .mtls
            .iter()
            .copied()
            .chain([self.expired, self.h2c])
            .collect();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("nginx exited ({status}):\n{}", self.errors());
            }
            if ports
                .iter()
                .all(|p| std::net::TcpStream::connect(("127.0.0.1", *p)).is_ok())
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nginx did not listen on {ports:?}:\n{}",
                self.errors()
            );
            std::thread::sleep(Duration::from_millis(30));
        }
    }

    fn errors(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.join(f)).unwrap_or_default();
        format!("{}{}", read("nginx.stderr"), read("error.log"))
    }

    fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }

    /// `https://127.0.0.1:PORT` of the i-th mTLS port.
    fn https(&self, i: usize) -> String {
        format!("https://127.0.0.1:{}", self.mtls[i])
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---- Gateway helpers ----

/// Top-level settings: short upstream timeouts, so nothing here can wait long.
fn top() -> &'static str {
    "healthCheckInterval: 60\ntimeouts:\n  connect: 2s\n  request: 4s\n"
}

/// One GET through the gateway, bounded by `CLIENT_LIMIT`: (status, headers, body).
async fn call(gw: &Gateway, path: &str) -> (u16, http::HeaderMap, String) {
    match tokio::time::timeout(CLIENT_LIMIT, get_with(gw.port, path, &[])).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => panic!("GET {path}: {e}\ngateway log:\n{}", gw.log()),
        Err(_) => panic!(
            "GET {path} took more than {CLIENT_LIMIT:?}\ngateway log:\n{}",
            gw.log()
        ),
    }
}

/// /metrics, bounded by `CLIENT_LIMIT`.
async fn metrics(gw: &Gateway) -> String {
    match tokio::time::timeout(CLIENT_LIMIT, get(gw.admin_port, "/metrics")).await {
        Ok(Ok((200, m))) => m,
        other => panic!("/metrics: {other:?}\ngateway log:\n{}", gw.log()),
    }
}

/// `hexgate_upstream_errors_total{service="S",reason="R"}`, 0 when absent.
fn reason_count(metrics: &str, service: &str, reason: &str) -> u64 {
    let prefix =
        format!("hexgate_upstream_errors_total{{service=\"{service}\",reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Every `hexgate_upstream_errors_total` line (for failure messages).
fn error_lines(metrics: &str) -> String {
    metrics
        .lines()
        .filter(|l| l.starts_with("hexgate_upstream_errors_total"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The gateway's log lines that say "request failed" and name `reason`, waiting up to 3 s.
async fn failure_logged(gw: &Gateway, reason: &str) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let log = gw.log();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("request failed") && l.contains(reason))
            .collect();
        if !lines.is_empty() {
            return Some(lines.join("\n"));
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What is wrong with an answer `(status, body)` to a request of `service` that met a TLS
/// failure: it must be a 502 without the backend's answer, counted in
/// `hexgate_upstream_errors_total{service,reason}` and named in a "request failed" log line.
async fn tls_failure_problems(
    gw: &Gateway,
    service: &str,
    status: u16,
    body: &str,
    reason: &str,
) -> Vec<String> {
    let mut problems = Vec::new();
    if status != 502 {
        problems.push(format!("status {status} (want 502), body {body}"));
    }
    if body.contains("protocol=") || body.contains("nginx") || body.contains("SSL") {
        problems.push(format!("the backend's answer reached the client: {body}"));
    }
    match failure_logged(gw, reason).await {
        None => problems.push(format!("no \"request failed\" log line naming {reason}")),
        Some(line) if !(line.contains("WARN") || line.contains("ERROR")) => {
            problems.push(format!("logged below WARN: {line}"))
        }
        Some(_) => {}
    }
    let m = metrics(gw).await;
    if reason_count(&m, service, reason) == 0 {
        problems.push(format!(
            "no hexgate_upstream_errors_total{{service=\"{service}\",reason=\"{reason}\"}}"
        ));
    }
    problems
}

/// A request to `path` (routed to `service`) fails with 502 and `reason`: in the status, in
/// `hexgate_upstream_errors_total{service,reason}` and in the gateway's "request failed" line.
async fn expect_tls_failure(gw: &Gateway, service: &str, path: &str, reason: &str) {
    let (s, _, body) = call(gw, path).await;
    let mut problems = tls_failure_problems(gw, service, s, &body, reason).await;
    // Again, with the backend known to fail (by this request or a health check): still a 502.
    let (s, _, body) = call(gw, path).await;
    if s != 502 {
        problems.push(format!(
            "second request: status {s} (want 502), body {body}"
        ));
    }
    assert!(
        problems.is_empty(),
        "a TLS failure ({reason}):\n- {}\nmetrics:\n{}\ngateway log:\n{}",
        problems.join("\n- "),
        error_lines(&metrics(gw).await),
        gw.log()
    );
}

/// A gateway with one service `s` on `/` to `backend` with `extra` service lines.
async fn one_service(backend: &str, extra: &str) -> Gateway {
    Gateway::start(&loopback_config(
        top(),
        &service("s", "/", &[backend], extra),
    ))
    .await
}

// ---- (a) mTLS ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_presents_the_client_certificate_and_verifies_the_backend() {
    let nginx = Nginx::start("mtls");
    let pki = &nginx.pki;
    // `named` verifies backend.test; `by_ip` leaves serverName out, so the name verified is the
    // backend's host, 127.0.0.1 (an IP SAN in the certificate).
    let by_ip = upstream_tls(&[
        ("caFile", pki.q("ca.pem")),
        ("certFile", pki.q("client.pem")),
        ("keyFile", pki.q("client-key.pem")),
    ]);
    let services = service("named", "/named/", &[&nginx.https(0)], &pki.good())
        + &service("by-ip", "/by-ip/", &[&nginx.https(1)], &by_ip);
    let gw = Gateway::start(&loopback_config(top(), &services)).await;

    let (s, h, body) = call(&gw, "/named/x?y=1").await;
    assert_eq!(s, 200, "{body}\n{}", gw.log());
    assert!(
        body.contains("dn=CN=hexgate-gw "),
        "nginx saw our client certificate: {body}"
    );
    assert!(body.contains("verify=SUCCESS "), "and verified it: {body}");
    assert!(
        body.contains("sni=backend.test "),
        "SNI is serverName: {body}"
    );
    assert!(body.contains("uri=/named/x?y=1"), "{body}");
    assert_eq!(h["x-client-dn"], "CN=hexgate-gw");
    assert_eq!(h["x-client-verify"], "SUCCESS");

    let (s, _, body) = call(&gw, "/by-ip/z").await;
    assert_eq!(s, 200, "IP SAN verified by default: {body}\n{}", gw.log());
    assert!(body.contains("dn=CN=hexgate-gw verify=SUCCESS"), "{body}");

    // Keep-alive upstream: a second round still carries the certificate (a pooled connection).
    for _ in 0..3 {
        let (s, _, body) = call(&gw, "/named/again").await;
        assert_eq!(s, 200, "{body}");
        assert!(body.contains("verify=SUCCESS"), "{body}");
    }
    let m = metrics(&gw).await;
    for reason in [
        "tls_unknown_ca",
        "tls_name_mismatch",
        "tls_handshake",
        "tls_client_cert_required",
    ] {
        assert_eq!(reason_count(&m, "named", reason), 0, "{}", error_lines(&m));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relative_tls_files_resolve_from_the_config_dir() {
    let nginx = Nginx::start("relative");
    let dir = temp_dir("gw-relative");
    for f in ["ca.pem", "client.pem", "client-key.pem"] {
        std::fs::copy(nginx.pki.dir.join(f), dir.join(f)).unwrap();
    }
    let tls = upstream_tls(&[
        ("caFile", "ca.pem".into()),
        ("serverName", "backend.test".into()),
        ("certFile", "client.pem".into()),
        ("keyFile", "client-key.pem".into()),
    ]);
    let yaml = loopback_config(top(), &service("s", "/", &[&nginx.https(0)], &tls));
    // The gateway runs in the test's working directory, which has no ca.pem: the config's does.
    assert!(!Path::new("ca.pem").exists());
    let gw = Gateway::start_in(dir, &yaml).await;
    let (s, _, body) = call(&gw, "/rel").await;
    assert_eq!(s, 200, "{body}\n{}", gw.log());
    assert!(body.contains("dn=CN=hexgate-gw verify=SUCCESS"), "{body}");
}

// ---- (b) ALPN ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_chooses_http2_under_auto_and_http1_when_asked() {
    let nginx = Nginx::start("alpn");
    let pki = &nginx.pki;
    let good = pki.good();
    // Each service its own port of the same nginx server: distinct backends, distinct pools.
    let services = service("dflt", "/default/", &[&nginx.https(0)], &good)
        + &service(
            "auto",
            "/auto/",
            &[&nginx.https(1)],
            &format!("{good}    upstreamProtocol: auto\n"),
        )
        + &service(
            "h1",
            "/h1/",
            &[&nginx.https(2)],
            &format!("{good}    upstreamProtocol: http1\n"),
        )
        + &service(
            "h2",
            "/h2/",
            &[&nginx.https(3)],
            &format!("{good}    upstreamProtocol: http2\n"),
        );
    let gw = Gateway::start(&loopback_config(top(), &services)).await;
    for (path, want) in [
        ("/default/a", "HTTP/2.0"),
        ("/auto/a", "HTTP/2.0"),
        ("/h1/a", "HTTP/1.1"),
        ("/h2/a", "HTTP/2.0"),
        // Twice each: a pooled (or multiplexed) connection keeps its protocol.
        ("/default/b", "HTTP/2.0"),
        ("/auto/b", "HTTP/2.0"),
        ("/h1/b", "HTTP/1.1"),
        ("/h2/b", "HTTP/2.0"),
    ] {
        let (s, h, body) = call(&gw, path).await;
        assert_eq!(s, 200, "{path}: {body}\n{}", gw.log());
        assert!(
            body.contains(&format!("protocol={want} ")),
            "{path}: nginx should report {want}: {body}"
        );
        assert_eq!(h["x-proto"], want, "{path}");
        assert!(body.contains("verify=SUCCESS"), "{path}: {body}");
    }
    // The client's side stays HTTP/1.1 whatever the upstream spoke.
    let log = nginx.access_log();
    assert!(log.contains(" HTTP/1.1 GET /h1/a 200 "), "{log}");
    assert!(log.contains(" HTTP/2.0 GET /auto/a 200 "), "{log}");
}

// ---- (c)-(f) verification failures ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_ca_is_a_502_with_reason_tls_unknown_ca() {
    let nginx = Nginx::start("unknown-ca");
    let pki = &nginx.pki;
    let tls = upstream_tls(&[
        ("caFile", pki.q("other-ca.pem")),
        ("serverName", "backend.test".into()),
        ("certFile", pki.q("client.pem")),
        ("keyFile", pki.q("client-key.pem")),
    ]);
    let gw = one_service(&nginx.https(0), &tls).await;
    expect_tls_failure(&gw, "s", "/x", "tls_unknown_ca").await;
    assert!(
        !nginx.access_log().contains("GET /x "),
        "no request reaches a backend that was not trusted:\n{}",
        nginx.access_log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_server_name_is_a_502_with_reason_tls_name_mismatch() {
    let nginx = Nginx::start("name");
    let pki = &nginx.pki;
    let tls = upstream_tls(&[
        ("caFile", pki.q("ca.pem")),
        ("serverName", "other.test".into()),
        ("certFile", pki.q("client.pem")),
        ("keyFile", pki.q("client-key.pem")),
    ]);
    let gw = one_service(&nginx.https(0), &tls).await;
    expect_tls_failure(&gw, "s", "/x", "tls_name_mismatch").await;
    assert!(
        !nginx.access_log().contains("GET /x "),
        "{}",
        nginx.access_log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_client_certificate_is_a_502_with_reason_tls_client_cert_required() {
    let nginx = Nginx::start("no-client-cert");
    let pki = &nginx.pki;
    let tls = upstream_tls(&[
        ("caFile", pki.q("ca.pem")),
        ("serverName", "backend.test".into()),
    ]);
    let gw = one_service(&nginx.https(0), &tls).await;
    // nginx completes the handshake and answers 400 "No required SSL certificate was sent": the
    // client gets a 502 that names the reason, not nginx's page.
    expect_tls_failure(&gw, "s", "/x", "tls_client_cert_required").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_from_another_ca_is_a_502() {
    let nginx = Nginx::start("other-client-cert");
    let pki = &nginx.pki;
    let tls = upstream_tls(&[
        ("caFile", pki.q("ca.pem")),
        ("serverName", "backend.test".into()),
        ("certFile", pki.q("other-client.pem")),
        ("keyFile", pki.q("other-client-key.pem")),
    ]);
    let gw = one_service(&nginx.https(0), &tls).await;
    // nginx answers 400 "The SSL certificate error": the backend refused our certificate.
    expect_tls_failure(&gw, "s", "/x", "tls_client_cert_refused").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_backend_certificate_is_a_502_with_reason_tls_expired() {
    let nginx = Nginx::start("expired");
    let pki = &nginx.pki;
    let tls = upstream_tls(&[
        ("caFile", pki.q("ca.pem")),
        ("serverName", "backend.test".into()),
    ]);
    let gw = one_service(&format!("https://127.0.0.1:{}", nginx.expired), &tls).await;
    expect_tls_failure(&gw, "s", "/x", "tls_expired").await;
    assert!(
        !nginx.access_log().contains("GET /x "),
        "{}",
        nginx.access_log()
    );
}

// ---- (g) h2c ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_backend_is_spoken_to_in_cleartext_http2() {
    let nginx = Nginx::start("h2c");
    let gw = one_service(&format!("h2c://127.0.0.1:{}", nginx.h2c), "").await;
    for i in 0..3 {
        let (s, h, body) = call(&gw, &format!("/h2c/{i}")).await;
        assert_eq!(s, 200, "{body}\n{}", gw.log());
        assert!(body.contains("protocol=HTTP/2.0 "), "{body}");
        assert_eq!(h["x-proto"], "HTTP/2.0");
    }
    // And an h2c client of the gateway is forwarded the same way.
    let (s, _, body) = tokio::time::timeout(CLIENT_LIMIT, get_h2c(gw.port, "/h2c/from-h2"))
        .await
        .expect("h2c request hung")
        .unwrap();
    assert_eq!(s, 200, "{body}");
    assert!(body.contains("protocol=HTTP/2.0 "), "{body}");
}

// ---- (h) insecureSkipVerify ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_skip_verify_accepts_an_unknown_ca_and_warns_at_every_load() {
    let nginx = Nginx::start("insecure");
    let pki = &nginx.pki;
    let tls = upstream_tls(&[
        ("caFile", pki.q("other-ca.pem")),
        ("serverName", "backend.test".into()),
        ("certFile", pki.q("client.pem")),
        ("keyFile", pki.q("client-key.pem")),
        ("insecureSkipVerify", "true".into()),
    ]);
    let yaml = loopback_config(top(), &service("s", "/", &[&nginx.https(0)], &tls));
    let gw = Gateway::start(&yaml).await;
    let (s, _, body) = call(&gw, "/insecure").await;
    assert_eq!(s, 200, "{body}\n{}", gw.log());
    assert!(
        body.contains("dn=CN=hexgate-gw verify=SUCCESS"),
        "mTLS still: {body}"
    );

    let warnings = |log: &str| {
        log.lines()
            .filter(|l| l.contains("WARN") && l.contains("insecureSkipVerify"))
            .count()
    };
    let log = gw.log();
    assert!(
        warnings(&log) >= 1,
        "a warning at load naming insecureSkipVerify:\n{log}"
    );
    let first = warnings(&log);
    // A reload (same settings) warns again.
    gw.rewrite_config(&format!("# reloaded\n{yaml}"));
    gw.wait_reloads(2).await; // the first load counts as 1
    let deadline = Instant::now() + Duration::from_secs(3);
    while warnings(&gw.log()) <= first {
        assert!(
            Instant::now() < deadline,
            "no new insecureSkipVerify warning after a reload:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(call(&gw, "/after-reload").await.0, 200);
}

// ---- (i) validate ----

#[test]
fn validate_refuses_bad_upstream_tls_files_at_their_key() {
    let dir = temp_dir("upstream-tls-validate");
    let pki = Pki::make(&dir);
    let head = "gatewayPort: \"8000\"\nservices:\n  - name: s\n    path: /\n    backends: [\"https://127.0.0.1:1\"]\n    upstreamTls:\n";
    // Line 7 is the first key of upstreamTls.
    let missing = format!("\"{}/no-such-ca.pem\"", dir.display());
    let cases: Vec<(String, &[&str], &str)> = vec![
        (
            format!("{head}      caFile: {missing}\n"),
            &["config.yaml:7: services[0].upstreamTls.caFile"],
            "no-such-ca.pem",
        ),
        (
            format!("{head}      caFile: {}\n", pki.q("pki.cnf")),
            &["config.yaml:7: services[0].upstreamTls.caFile"],
            "",
        ),
        (
            format!(
                "{head}      caFile: {}\n      certFile: {}\n",
                pki.q("ca.pem"),
                pki.q("client.pem")
            ),
            &[
                "config.yaml:8: services[0].upstreamTls.keyFile",
                "config.yaml:8: services[0].upstreamTls.certFile",
            ],
            "",
        ),
        (
            format!("{head}      keyFile: {}\n", pki.q("client-key.pem")),
            &[
                "config.yaml:7: services[0].upstreamTls.keyFile",
                "config.yaml:7: services[0].upstreamTls.certFile",
            ],
            "",
        ),
        (
            format!(
                "{head}      certFile: \"{}/no-such-cert.pem\"\n      keyFile: {}\n",
                dir.display(),
                pki.q("client-key.pem")
            ),
            &["config.yaml:7: services[0].upstreamTls.certFile"],
            "no-such-cert.pem",
        ),
        (
            format!(
                "{head}      certFile: {}\n      keyFile: {}\n",
                pki.q("client.pem"),
                pki.q("other-client-key.pem")
            ),
            &[
                "config.yaml:8: services[0].upstreamTls.keyFile",
                "config.yaml:7: services[0].upstreamTls.certFile",
            ],
            "",
        ),
    ];
    for (yaml, at, what) in &cases {
        let (code, out, err) = validate_yaml(yaml, &[]);
        assert_ne!(code, 0, "validate accepted:\n{yaml}\n{out}{err}");
        assert_eq!(code, 2, "the exit code of a refused config:\n{err}");
        assert!(
            at.iter().any(|a| err.contains(a)) && err.contains(what),
            "validate should say one of {at:?} (and {what:?}), said:\n{err}\nfor\n{yaml}"
        );
        // `hexgate run` refuses it the same way, before serving.
        let f = dir.join("config.yaml");
        std::fs::write(&f, yaml).unwrap();
        let run = Command::new(bin())
            .args(["run", "--config"])
            .arg(&f)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let run = wait_output(run, Duration::from_secs(8));
        let run_err = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(2), "run: {run_err}");
        assert!(
            at.iter().any(|a| run_err.contains(a)),
            "run said:\n{run_err}"
        );
    }
    // The same files, right, are accepted.
    let good = format!(
        "{head}      caFile: {}\n      serverName: backend.test\n      certFile: {}\n      keyFile: {}\n    upstreamProtocol: http1\n",
        pki.q("ca.pem"),
        pki.q("client.pem"),
        pki.q("client-key.pem")
    );
    let (code, out, err) = validate_yaml(&good, &[]);
    assert_eq!(code, 0, "{out}{err}");
    // An unknown protocol is refused at its key.
    let (code, _, err) = validate_yaml(
        "gatewayPort: \"8000\"\nservices:\n  - name: s\n    path: /\n    backends: [\"https://127.0.0.1:1\"]\n    upstreamProtocol: http3\n",
        &[],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("config.yaml:6: services[0].upstreamProtocol"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A child's output, killing it if it runs past `limit` (so a `run` that serves fails the test).
fn wait_output(mut child: Child, limit: Duration) -> std::process::Output {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return child.wait_with_output().unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    panic!(
        "hexgate run did not refuse the config within {limit:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---- Active health checks over TLS ----

/// The value of `hexgate_upstream_healthy` for `service`'s backend on `port`, if listed.
fn healthy_value(metrics: &str, service: &str, port: u16) -> Option<String> {
    let prefix = format!("hexgate_upstream_healthy{{service=\"{service}\",");
    let at = format!("127.0.0.1:{port}\"");
    metrics
        .lines()
        .find(|l| l.starts_with(&prefix) && l.contains(&at))
        .and_then(|l| l.rsplit(' ').next())
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_health_checks_speak_mtls_to_https_backends() {
    let nginx = Nginx::start("health");
    let pki = &nginx.pki;
    let stale = upstream_tls(&[
        ("caFile", pki.q("ca.pem")),
        ("serverName", "backend.test".into()),
    ]);
    let services = service(
        "s",
        "/s/",
        &[&nginx.https(0)],
        &format!("{}    healthCheckPath: /probe/s\n", pki.good()),
    ) + &service(
        "stale",
        "/stale/",
        &[&format!("https://127.0.0.1:{}", nginx.expired)],
        &format!("{stale}    healthCheckPath: /probe/stale\n"),
    );
    let top =
        "healthCheckInterval: 1\nhealthCheckTimeout: 1s\ntimeouts:\n  connect: 2s\n  request: 4s\n";
    let gw = Gateway::start(&loopback_config(top, &services)).await;

    // Two probes of the TLS backend answered 200 to our client certificate, and both backends
    // judged: the good one healthy, the one with the expired certificate not.
    let deadline = Instant::now() + Duration::from_secs(8);
    let probe = format!("{} HTTP/", nginx.mtls[0]);
    loop {
        let log = nginx.access_log();
        let probes = log
            .lines()
            .filter(|l| {
                l.starts_with(&probe)
                    && l.contains(" GET /probe/s 200 ")
                    && l.contains("dn=\"CN=hexgate-gw\" verify=SUCCESS sni=backend.test")
            })
            .count();
        let m = metrics(&gw).await;
        let (good, bad) = (
            healthy_value(&m, "s", nginx.mtls[0]),
            healthy_value(&m, "stale", nginx.expired),
        );
        if probes >= 2 && good.as_deref() == Some("1") && bad.as_deref() == Some("0") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "probes over mTLS: {probes}, healthy s={good:?} stale={bad:?}\nnginx:\n{log}\nmetrics:\n{}\ngateway:\n{}",
            m.lines()
                .filter(|l| l.starts_with("hexgate_upstream_healthy"))
                .collect::<Vec<_>>()
                .join("\n"),
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (s, _, body) = call(&gw, "/s/after-probes").await;
    assert_eq!(s, 200, "{body}");
    assert!(
        !nginx.access_log().contains("/probe/stale"),
        "the expired backend never got a probe through:\n{}",
        nginx.access_log()
    );
}

// ---- Two services, one backend, different TLS settings ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_settings_are_per_service_even_for_a_shared_backend() {
    let nginx = Nginx::start("shared");
    let pki = &nginx.pki;
    let untrusting = upstream_tls(&[
        ("caFile", pki.q("other-ca.pem")),
        ("serverName", "backend.test".into()),
        ("certFile", pki.q("client.pem")),
        ("keyFile", pki.q("client-key.pem")),
    ]);
    let anonymous = upstream_tls(&[
        ("caFile", pki.q("ca.pem")),
        ("serverName", "backend.test".into()),
    ]);
    let backend = nginx.https(0);
    // The failing services come first, so a per-address shortcut would pick their settings.
    let services = service("untrusting", "/untrusting/", &[&backend], &untrusting)
        + &service("anonymous", "/anonymous/", &[&backend], &anonymous)
        + &service("good", "/good/", &[&backend], &pki.good());
    let top = "healthCheckInterval: 1\ntimeouts:\n  connect: 2s\n  request: 4s\n";
    let gw = Gateway::start(&loopback_config(top, &services)).await;

    // Rounds over a few health-check intervals: `good` always works (a pooled mTLS connection is
    // there to be wrongly shared after its first request), the others never do.
    let deadline = Instant::now() + Duration::from_millis(2500);
    let mut rounds = 0;
    while Instant::now() < deadline || rounds < 2 {
        rounds += 1;
        let (s, _, body) = call(&gw, "/good/r").await;
        assert_eq!(s, 200, "round {rounds}: {body}\n{}", gw.log());
        assert!(body.contains("verify=SUCCESS"), "{body}");
        for svc in ["untrusting", "anonymous"] {
            let (s, _, body) = call(&gw, &format!("/{svc}/r")).await;
            assert_ne!(
                s, 200,
                "round {rounds}: {svc} must not borrow good's TLS settings or connections: {body}"
            );
            assert!(!body.contains("protocol="), "{svc}: {body}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let m = metrics(&gw).await;
    assert!(
        reason_count(&m, "untrusting", "tls_unknown_ca") >= 1,
        "{}",
        error_lines(&m)
    );
    assert!(
        reason_count(&m, "anonymous", "tls_client_cert_required") >= 1,
        "{}",
        error_lines(&m)
    );
    assert!(
        !nginx.access_log().contains("GET /untrusting/"),
        "{}",
        nginx.access_log()
    );
}

// ---- Reloads ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_new_tls_settings_to_new_and_pooled_connections() {
    let nginx = Nginx::start("reload");
    let pki = &nginx.pki;
    let backend = nginx.https(0);
    let config = |tls: &str| loopback_config(top(), &service("s", "/", &[&backend], tls));
    let untrusting = upstream_tls(&[
        ("caFile", pki.q("other-ca.pem")),
        ("serverName", "backend.test".into()),
        ("certFile", pki.q("client.pem")),
        ("keyFile", pki.q("client-key.pem")),
    ]);
    let gw = Gateway::start(&config(&untrusting)).await;
    let (s, _, body) = call(&gw, "/one").await;
    assert_ne!(s, 200, "{body}");

    // Fixed by a reload: the right CA.
    gw.rewrite_config(&config(&pki.good()));
    gw.wait_reloads(2).await; // the first load counts as 1
    let (s, _, body) = call(&gw, "/two").await;
    assert_eq!(s, 200, "after the reload: {body}\n{}", gw.log());
    assert!(body.contains("verify=SUCCESS"), "{body}");

    // A reload with a missing caFile is refused at its key; the running settings keep serving.
    let missing = upstream_tls(&[
        ("caFile", format!("\"{}/gone.pem\"", pki.dir.display())),
        ("serverName", "backend.test".into()),
    ]);
    gw.rewrite_config(&config(&missing));
    gw.wait_failed_reloads(1).await;
    assert!(
        gw.log().contains("services[0].upstreamTls.caFile"),
        "the refused reload names the key:\n{}",
        gw.log()
    );
    let (s, _, body) = call(&gw, "/three").await;
    assert_eq!(s, 200, "old settings still serve: {body}");

    // The CA withdrawn by a reload: a connection verified under the old trust (pooled by the
    // requests above) must not carry another request.
    gw.rewrite_config(&config(&untrusting));
    gw.wait_reloads(3).await;
    for i in 0..3 {
        let (s, _, body) = call(&gw, &format!("/four/{i}")).await;
        assert_ne!(
            s,
            200,
            "request {i} after the CA was withdrawn went through: {body}\n{}",
            gw.log()
        );
    }
    assert!(
        !nginx.access_log().contains("GET /four/"),
        "{}",
        nginx.access_log()
    );
}

// ---- (j) nothing hangs ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_or_plaintext_peer_fails_fast() {
    let nginx = Nginx::start("silent");
    let pki = &nginx.pki;
    // A peer that accepts TCP and never says anything: the handshake must time out.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let tls = upstream_tls(&[
        ("caFile", pki.q("ca.pem")),
        ("serverName", "backend.test".into()),
    ]);
    let services = service("silent", "/silent/", &[&format!("https://127.0.0.1:{silent_port}")], &tls)
        // https:// to nginx's cleartext h2c port: not TLS at all.
        + &service("plain", "/plain/", &[&format!("https://127.0.0.1:{}", nginx.h2c)], &tls);
    let top = "healthCheckInterval: 60\ntimeouts:\n  connect: 1s\n  request: 3s\n";
    let gw = Gateway::start(&loopback_config(top, &services)).await;

    let started = Instant::now();
    let (s, _, body) = call(&gw, "/silent/x").await;
    assert!(
        (502..=504).contains(&s),
        "a silent TLS peer: {s} {body}\n{}",
        gw.log()
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );

    let started = Instant::now();
    let (s, _, body) = call(&gw, "/plain/x").await;
    assert_eq!(s, 502, "TLS to a cleartext server: {body}\n{}", gw.log());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let m = metrics(&gw).await;
    assert!(
        reason_count(&m, "plain", "tls_handshake") >= 1,
        "{}",
        error_lines(&m)
    );
    let silent_reasons = ["connect_timeout", "tls_handshake", "response_timeout"];
    assert!(
        silent_reasons
            .iter()
            .any(|r| reason_count(&m, "silent", r) >= 1),
        "{}",
        error_lines(&m)
    );
    hold.abort();
}

// ---- The reasons on the request path (discovered instances: no active health checks) ----

/// Each verification failure, on instances found through Consul (`Meta.protocol: https`), which
/// active health checks leave alone: so the first request meets the TLS failure itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_failure_reasons_of_discovered_instances() {
    need("consul");
    let nginx = Nginx::start("discovered");
    let consul = ConsulAgent::start();
    let pki = &nginx.pki;
    let tls = |ca: &str, name: &str, client: bool| {
        let mut f = vec![("caFile", pki.q(ca)), ("serverName", name.to_string())];
        if client {
            f.push(("certFile", pki.q("client.pem")));
            f.push(("keyFile", pki.q("client-key.pem")));
        }
        upstream_tls(&f)
    };
    let cases = [
        ("good", nginx.mtls[0], pki.good(), ""),
        (
            "unknown-ca",
            nginx.mtls[1],
            tls("other-ca.pem", "backend.test", true),
            "tls_unknown_ca",
        ),
        (
            "name",
            nginx.mtls[2],
            tls("ca.pem", "other.test", true),
            "tls_name_mismatch",
        ),
        (
            "no-cert",
            nginx.mtls[3],
            tls("ca.pem", "backend.test", false),
            "tls_client_cert_required",
        ),
        (
            "expired",
            nginx.expired,
            tls("ca.pem", "backend.test", false),
            "tls_expired",
        ),
        (
            "plain",
            nginx.h2c,
            tls("ca.pem", "backend.test", false),
            "tls_handshake",
        ),
    ];
    let mut services = String::new();
    for (name, port, tls, _) in &cases {
        consul.register_json(&format!(
            r#"{{"ID":"i-{name}","Name":"tls-{name}","Address":"127.0.0.1","Port":{port},"Meta":{{"protocol":"https"}}}}"#
        ));
        services.push_str(&format!(
            "  - name: {name}\n    path: /{name}/\n    consulServiceName: tls-{name}\n{tls}"
        ));
    }
    let gw = Gateway::start_with(
        temp_dir("gw-discovered"),
        &loopback_config(top(), &services),
        &[("CONSUL_HTTP_ADDR", &consul.addr())],
    )
    .await;

    let mut problems = Vec::new();
    for (name, _, _, reason) in &cases {
        // Until discovery has found the instance: 503.
        let deadline = Instant::now() + Duration::from_secs(15);
        let (s, body) = loop {
            let (s, _, body) = call(&gw, &format!("/{name}/x")).await;
            if s != 503 || Instant::now() >= deadline {
                break (s, body);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if reason.is_empty() {
            if s != 200 || !body.contains("verify=SUCCESS") {
                problems.push(format!("{name}: {s} {body}"));
            }
            continue;
        }
        for p in tls_failure_problems(&gw, name, s, &body, reason).await {
            problems.push(format!("{name} ({reason}): {p}"));
        }
    }
    assert!(
        problems.is_empty(),
        "\n- {}\nmetrics:\n{}\ngateway log:\n{}",
        problems.join("\n- "),
        error_lines(&metrics(&gw).await),
        gw.log()
    );
}
