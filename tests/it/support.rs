//! Shared fixtures: real backends on loopback ports, the real `hexgate` binary as a child process,
//! and small HTTP clients. Every server binds 127.0.0.1 and is stopped when its handle drops.
//! Raw-socket clients are in `raw`, redis-server and Consul in `daemons` (re-exported here).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

pub use crate::daemons::{ConsulAgent, RedisServer};

/// A loopback port for a server a test starts later (nginx, consul, a gateway).
pub fn free_port() -> u16 {
    free_run(0)
}

/// A free port p with p+1 ..= p+extra free too (consul takes several consecutive ports).
///
/// A port probed free and bound later can be taken in between; ports from the kernel's ephemeral
/// range (bind to port 0, and the source port of every outgoing connection) are the ones that get
/// taken. So these come from just below that range, handed out once per test process by a counter
/// (starting at an offset from the process id), and each is checked to be bindable.
pub fn free_run(extra: u16) -> u16 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(32768);
    let width = 10_000u64.min(low.saturating_sub(1024));
    assert!(
        width > 1000,
        "the ephemeral port range starts at {low}: no room below it for test ports"
    );
    let base = low - width;
    let _ = NEXT.compare_exchange(
        0,
        u64::from(std::process::id()) * 97 % width + 1,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..width {
        let start = NEXT.fetch_add(u64::from(extra) + 1, Ordering::Relaxed) % width;
        if start + u64::from(extra) >= width {
            continue;
        }
        let p = (base + start) as u16;
        if (0..=extra).all(|i| std::net::TcpListener::bind(("127.0.0.1", p + i)).is_ok()) {
            return p;
        }
    }
    panic!("no free run of {} loopback ports below {low}", extra + 1);
}

pub fn temp_dir(name: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "hexgate-it-{}-{}-{}",
        std::process::id(),
        name,
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// What a test backend does with each request.
#[derive(Clone, Copy)]
pub enum Behaviour {
    /// "Hello from Backend (Port N)", echoing the path in `x-path` and request headers as `x-seen-*`.
    Hello,
    /// Sleeps before answering.
    Slow(Duration),
    /// Reads the whole body and answers with its length.
    CountBody,
    /// Accepts a WebSocket-style Upgrade and echoes bytes back.
    UpgradeEcho,
}

/// A real HTTP backend on a loopback port, counting requests; aborted on drop.
pub struct TestBackend {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
    /// Set to true to drop every open connection too, like a killed process.
    kill: tokio::sync::watch::Sender<bool>,
}

impl TestBackend {
    pub async fn start(behaviour: Behaviour) -> TestBackend {
        Self::start_on(TcpListener::bind("127.0.0.1:0").await.unwrap(), behaviour)
    }

    pub fn start_on(listener: TcpListener, behaviour: Behaviour) -> TestBackend {
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicU64::new(0));
        let h = hits.clone();
        let (kill, kill_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let h = h.clone();
                let mut kill_rx = kill_rx.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let h = h.clone();
                        async move { Ok::<_, Infallible>(answer(req, behaviour, addr.port(), &h).await) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades();
                    tokio::select! {
                        _ = conn => {}
                        _ = kill_rx.wait_for(|k| *k) => {}
                    }
                });
            }
        });
        TestBackend {
            addr,
            hits,
            task,
            kill,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Stops listening and drops every open connection, like a killed process.
    pub fn stop(&self) {
        self.task.abort();
        let _ = self.kill.send(true);
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn answer(
    mut req: Request<Incoming>,
    behaviour: Behaviour,
    port: u16,
    hits: &AtomicU64,
) -> Response<Full<Bytes>> {
    if req.uri().path() == "/health" {
        return Response::new(Full::new(Bytes::from_static(b"OK")));
    }
    hits.fetch_add(1, Ordering::Relaxed);
    let mut builder = Response::builder()
        .header("x-backend-port", port.to_string())
        .header("x-path", req.uri().to_string());
    for (k, v) in req.headers() {
        if k.as_str().starts_with("x-") || k == http::header::HOST {
            builder = builder.header(format!("x-seen-{}", k.as_str()), v.clone());
        }
    }
    match behaviour {
        Behaviour::Hello => builder
            .body(Full::new(Bytes::from(format!(
                "Hello from Backend (Port {port})"
            ))))
            .unwrap(),
        Behaviour::Slow(d) => {
            tokio::time::sleep(d).await;
            builder.body(Full::new(Bytes::from("slow"))).unwrap()
        }
        Behaviour::CountBody => {
            let mut n: u64 = 0;
            let mut body = req.into_body();
            // A body cut off by the client (the fault tests do that) simply ends the count.
            while let Some(Ok(frame)) = body.frame().await {
                if let Ok(d) = frame.into_data() {
                    n += d.len() as u64;
                }
            }
            builder.body(Full::new(Bytes::from(n.to_string()))).unwrap()
        }
        Behaviour::UpgradeEcho => {
            // A real WebSocket server's answer: the accept for the client's key (RFC 6455 4.2.2),
            // which the gateway checks before it opens a tunnel.
            let accept = websocket_accept(
                req.headers()
                    .get("sec-websocket-key")
                    .map_or(&b""[..], |k| k.as_bytes()),
            );
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(up) = on.await {
                    let mut io = TokioIo::new(up);
                    let (mut r, mut w) = tokio::io::split(&mut io);
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
            });
            builder
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-accept", accept)
                .body(Full::new(Bytes::new()))
                .unwrap()
        }
    }
}

/// The `Sec-WebSocket-Accept` that answers the client's `Sec-WebSocket-Key` (RFC 6455 4.2.2).
pub fn websocket_accept(key: &[u8]) -> String {
    use base64::Engine as _;
    let mut sha1 = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    sha1.update(key);
    sha1.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(sha1.finish())
}

/// A `hexgate run` child process with its config file; killed on drop.
pub struct Gateway {
    pub child: Child,
    pub port: u16,
    pub admin_port: u16,
    pub dir: PathBuf,
    pub config: PathBuf,
}

/// The example backend binary, built by `cargo test` beside the test binary's directory.
pub fn example_backend() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join("backend");
    assert!(
        path.exists(),
        "{} missing: run `cargo build --examples`",
        path.display()
    );
    path
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_hexgate")
}

/// A gateway config on loopback (`{port}` and `{admin}` filled in at start): `top` lines, then
/// `services` (items from `service`).
pub fn loopback_config(top: &str, services: &str) -> String {
    format!(
        "gatewayPort: \"{{port}}\"\ngatewayBind: 127.0.0.1\nadminPort: \"{{admin}}\"\n{top}services:\n{services}"
    )
}

/// One item of a config's `services` list: `extra` lines follow `backends`.
pub fn service(name: &str, path: &str, backends: &[&str], extra: &str) -> String {
    let list = backends
        .iter()
        .map(|b| format!("\"{b}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!("  - name: {name}\n    path: {path}\n    backends: [{list}]\n{extra}")
}

/// `hexgate keygen --out DIR`: DIR/private.pem and DIR/public.pem.
pub fn hexgate_keygen(dir: &std::path::Path) {
    let out = Command::new(bin())
        .args(["keygen", "--out"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "keygen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `hexgate validate` on `yaml` (written to a temporary file) with `env` and no
/// HEXGATE_ADMIN_TOKEN unless `env` gives one: (exit code, stdout, stderr).
pub fn validate_yaml(yaml: &str, env: &[(&str, &str)]) -> (i32, String, String) {
    let dir = temp_dir("validate");
    let f = dir.join("config.yaml");
    std::fs::write(&f, yaml).unwrap();
    let out = Command::new(bin())
        .arg("validate")
        .arg(&f)
        .env_remove("HEXGATE_ADMIN_TOKEN")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

impl Gateway {
    /// Writes `yaml` (with `{port}` and `{admin}` replaced) and starts the gateway on it.
    pub async fn start(yaml: &str) -> Gateway {
        let dir = temp_dir("gw");
        Self::start_in(dir, yaml).await
    }

    pub async fn start_in(dir: PathBuf, yaml: &str) -> Gateway {
        Self::start_with(dir, yaml, &[]).await
    }

    /// Starts with extra environment variables (e.g. CONSUL_HTTP_ADDR).
    pub async fn start_with(dir: PathBuf, yaml: &str, env: &[(&str, &str)]) -> Gateway {
        let port = free_port();
        let admin_port = free_port();
        let config = dir.join("config.yaml");
        std::fs::write(&config, fill(yaml, port, admin_port, &dir)).unwrap();
        let stdout = std::fs::File::create(dir.join("stdout.log")).unwrap();
        let mut cmd = Command::new(bin());
        cmd.args(["run", "--config"])
            .arg(&config)
            .envs(env.iter().copied())
            .stdout(stdout);
        Self::launch(cmd, port, admin_port, dir, config).await
    }

    /// `hexgate run --consul-key KEY` with the ports the stored config names.
    pub async fn start_consul_key(consul: &str, key: &str, port: u16, admin_port: u16) -> Gateway {
        let dir = temp_dir("gwkv");
        let mut cmd = Command::new(bin());
        cmd.args(["run", "--consul-key", key])
            .env("CONSUL_HTTP_ADDR", consul)
            .stdout(Stdio::null());
        let config = dir.join("none");
        Self::launch(cmd, port, admin_port, dir, config).await
    }

    /// Spawns `cmd` (logging at info to DIR/gateway.log) and waits until it is ready.
    async fn launch(
        mut cmd: Command,
        port: u16,
        admin_port: u16,
        dir: PathBuf,
        config: PathBuf,
    ) -> Gateway {
        let log = std::fs::File::create(dir.join("gateway.log")).unwrap();
        let child = cmd
            .env("HEXGATE_LOG", "info")
            .stderr(log)
            .spawn()
            .expect("spawn hexgate");
        let gw = Gateway {
            child,
            port,
            admin_port,
            dir,
            config,
        };
        gw.wait_ready().await;
        gw
    }

    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok((s, _)) = get(self.admin_port, "/healthz").await {
                if s == 200 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("gateway did not become ready; log:\n{}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("gateway.log")).unwrap_or_default()
    }

    /// What the gateway wrote on stdout (the access log).
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.join("stdout.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([format!("-{sig}"), self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Resident memory of the gateway process in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap()
    }

    pub fn rewrite_config(&self, yaml: &str) {
        let text = fill(yaml, self.port, self.admin_port, &self.dir);
        let tmp = self.dir.join("config.yaml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.config).unwrap();
    }

    pub async fn metrics(&self) -> String {
        get(self.admin_port, "/metrics").await.unwrap().1
    }

    /// Waits until the reload counter reaches `n` successes.
    pub async fn wait_reloads(&self, n: u64) {
        self.wait_reload_count("success", n).await;
    }

    /// Waits until the reload counter reaches `n` failures (refused configs).
    pub async fn wait_failed_reloads(&self, n: u64) {
        self.wait_reload_count("failure", n).await;
    }

    async fn wait_reload_count(&self, result: &str, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let want = format!("hexgate_config_reloads_total{{result=\"{result}\"}} {n}");
        while Instant::now() < deadline {
            if self.metrics().await.contains(&want) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("reload {result} {n} not seen; log:\n{}", self.log());
    }

    /// Waits for the process to exit, up to `limit`, returning its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

/// `yaml` with `{port}`, `{admin}` and `{dir}` replaced.
fn fill(yaml: &str, port: u16, admin_port: u16, dir: &std::path::Path) -> String {
    yaml.replace("{port}", &port.to_string())
        .replace("{admin}", &admin_port.to_string())
        .replace("{dir}", &dir.display().to_string())
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub type Resp = (u16, String);

/// One GET over a fresh HTTP/1.1 connection.
pub async fn get(port: u16, path: &str) -> Result<Resp, String> {
    get_with(port, path, &[]).await.map(|r| (r.0, r.2))
}

/// One GET with `Host: localhost` and the `fields` given, over a fresh HTTP/1.1 connection:
/// (status, headers, body).
pub async fn get_with(
    port: u16,
    path: &str,
    fields: &[(&str, &str)],
) -> Result<(u16, http::HeaderMap, String), String> {
    let mut b = Request::get(path).header("host", "localhost");
    for (name, value) in fields {
        b = b.header(*name, *value);
    }
    request(port, b.body(Empty::<Bytes>::new()).unwrap()).await
}

/// One request over a fresh HTTP/1.1 connection: (status, headers, body).
pub async fn request<B>(
    port: u16,
    req: Request<B>,
) -> Result<(u16, http::HeaderMap, String), String>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut sender = http1(port).await?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    read_all(resp).await
}

/// An HTTP/1.1 client connection to 127.0.0.1:`port`, its driver spawned.
async fn http1<B>(port: u16) -> Result<hyper::client::conn::http1::SendRequest<B>, String>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(sender)
}

/// A response's status, headers and whole body (as text).
async fn read_all(resp: Response<Incoming>) -> Result<(u16, http::HeaderMap, String), String> {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, headers, String::from_utf8_lossy(&body).into_owned()))
}

/// A keep-alive HTTP/1.1 client on one connection, reconnecting when the server closes it.
pub struct KeepAlive {
    port: u16,
    sender: Option<hyper::client::conn::http1::SendRequest<Empty<Bytes>>>,
}

impl KeepAlive {
    pub fn new(port: u16) -> Self {
        KeepAlive { port, sender: None }
    }

    pub async fn get(&mut self, path: &str) -> Result<Resp, String> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            self.sender = Some(http1(self.port).await?);
        }
        let sender = self.sender.as_mut().unwrap();
        sender.ready().await.map_err(|e| e.to_string())?;
        let req = Request::get(path)
            .header("host", "localhost")
            .body(Empty::new())
            .unwrap();
        let resp = match sender.send_request(req).await {
            Ok(r) => r,
            Err(e) => {
                self.sender = None;
                return Err(e.to_string());
            }
        };
        read_all(resp).await.map(|r| (r.0, r.2))
    }
}

/// One GET over HTTP/2 with prior knowledge (h2c).
pub async fn get_h2c(port: u16, path: &str) -> Result<(u16, http::Version, String), String> {
    let stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::get(format!("http://localhost:{port}{path}"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let version = resp.version();
    let (status, _, body) = read_all(resp).await?;
    Ok((status, version, body))
}

/// A self-signed certificate for localhost and 127.0.0.1, one day long: `DIR/STEMcert.pem`
/// and `DIR/STEMkey.pem` (openssl).
pub fn self_signed_cert(dir: &std::path::Path, stem: &str) -> (PathBuf, PathBuf) {
    require_tool("openssl");
    let (cert, key) = (
        dir.join(format!("{stem}cert.pem")),
        dir.join(format!("{stem}key.pem")),
    );
    let ok = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    (cert, key)
}

/// Asserts that a command-line tool the tests need is installed, naming the setup command.
pub fn require_tool(name: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        found,
        "`{name}` is not installed: run `make setup` (scripts/setup.sh) first"
    );
}

/// Runs `hexgate` with args and CONSUL_HTTP_ADDR set: (exit code, stdout, stderr).
pub fn hexgate_cli(consul: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin())
        .args(args)
        .env("CONSUL_HTTP_ADDR", consul)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The Redis key of a limit counted by a header's value: the value appears only as a digest
/// (`h:` and the first 128 bits of its SHA-256 in hex), so a credential in the header is never
/// written to Redis.
pub fn header_limit_key(kind: char, scope: &str, value: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, value.as_bytes());
    let hex: String = d.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("hexgate:{{{kind}:{scope}:h:{hex}}}")
}

/// One request over HTTP/2 with prior knowledge (h2c): (status, headers, body).
pub async fn h2c_with(
    port: u16,
    path: &str,
    fields: &[(&str, &str)],
) -> (u16, http::HeaderMap, String) {
    let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut b = Request::get(format!("http://localhost:{port}{path}"));
    for (n, v) in fields {
        b = b.header(*n, *v);
    }
    let resp = sender
        .send_request(b.body(Empty::<Bytes>::new()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}
