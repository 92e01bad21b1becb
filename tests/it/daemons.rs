//! The servers the tests run beside the gateway: a real redis-server and a real Consul dev agent
//! on free loopback ports, each stopped (by pid) when its handle drops.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{free_port, require_tool, temp_dir};

/// A real redis-server on a free loopback port, stopped by pid on drop.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    pub dir: PathBuf,
    extra: Vec<String>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> RedisServer {
        require_tool("redis-server");
        let port = free_port();
        let dir = temp_dir("redis");
        let mut r = RedisServer {
            port,
            child: None,
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        r.restart();
        r
    }

    /// Starts (again) on the same port, with empty data.
    pub fn restart(&mut self) {
        self.kill();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--dir"])
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.cli(&["PING"]).trim() == "PONG" {
                return;
            }
            std::thread::sleep(Duration::from_millis(30));
        }
        panic!("redis-server on {} did not start", self.port);
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs redis-cli against this server and returns its stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Calls of `cmd` from INFO commandstats.
    pub fn calls(&self, cmd: &str) -> u64 {
        let info = self.cli(&["INFO", "commandstats"]);
        let prefix = format!("cmdstat_{cmd}:calls=");
        info.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A three-master Redis Cluster of real redis-servers on free loopback ports (no replicas),
/// stopped with its nodes.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts three nodes, creates the cluster and waits until every node reports it ok.
    pub fn start() -> RedisCluster {
        require_tool("redis-cli");
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                // The cluster bus port is given too (its default, port + 10000, is not reserved).
                let bus = free_port().to_string();
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-node-timeout",
                    "2000",
                    "--cluster-port",
                    &bus,
                ])
            })
            .collect();
        let cluster = RedisCluster { nodes };
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(cluster.addrs())
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while !cluster
            .nodes
            .iter()
            .all(|n| n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"))
        {
            assert!(Instant::now() < deadline, "cluster never became ok");
            std::thread::sleep(Duration::from_millis(100));
        }
        cluster
    }

    /// `127.0.0.1:PORT` of each node.
    pub fn addrs(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect()
    }

    /// The gateway's `redis` block for this cluster.
    pub fn config(&self) -> String {
        let list: Vec<String> = self.addrs().iter().map(|a| format!("\"{a}\"")).collect();
        format!("redis:\n  cluster: [{}]\n  timeout: 2s\n", list.join(", "))
    }
}

/// A real `consul agent -dev` on free loopback ports (DNS and gRPC off), stopped by pid on drop.
pub struct ConsulAgent {
    pub http_port: u16,
    ports: [u16; 4],
    child: Option<Child>,
    pub dir: PathBuf,
}

impl ConsulAgent {
    pub fn start() -> ConsulAgent {
        require_tool("consul");
        let mut a = ConsulAgent {
            http_port: free_port(),
            ports: [free_port(), free_port(), free_port(), 0],
            child: None,
            dir: temp_dir("consul"),
        };
        a.ports[3] = a.http_port;
        a.restart();
        a
    }

    pub fn addr(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// Starts a fresh dev agent (empty catalog and KV) on the same ports.
    pub fn restart(&mut self) {
        self.kill();
        let log = std::fs::File::create(self.dir.join("consul.log")).unwrap();
        let child = Command::new("consul")
            .args([
                "agent",
                "-dev",
                "-bind=127.0.0.1",
                "-client=127.0.0.1",
                "-dns-port=-1",
                "-grpc-port=-1",
            ])
            .arg(format!("-http-port={}", self.http_port))
            .arg(format!("-serf-lan-port={}", self.ports[0]))
            .arg(format!("-serf-wan-port={}", self.ports[1]))
            .arg(format!("-server-port={}", self.ports[2]))
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .expect("start consul");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let out = Command::new("curl")
                .args([
                    "-s",
                    "-m",
                    "1",
                    &format!("{}/v1/status/leader", self.addr()),
                ])
                .output();
            if let Ok(o) = out {
                let s = String::from_utf8_lossy(&o.stdout);
                if s.contains("127.0.0.1:") {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("consul did not elect itself leader");
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A raw HTTP call to the agent with curl: (status, body).
    pub fn http(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-m", "5", "-X", method, "-w", "\n%{http_code}"]);
        if let Some(b) = body {
            cmd.args(["--data-binary", b]);
        }
        cmd.arg(format!("{}{}", self.addr(), path));
        let out = cmd.output().expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    /// Registers a backend with an HTTP check on its /health every second.
    pub fn register(&self, id: &str, service: &str, port: u16) {
        let def = format!(
            r#"{{"ID":"{id}","Name":"{service}","Address":"127.0.0.1","Port":{port},"Check":{{"HTTP":"http://127.0.0.1:{port}/health","Interval":"1s","Timeout":"1s"}}}}"#
        );
        let (code, body) = self.http("PUT", "/v1/agent/service/register", Some(&def));
        assert_eq!(code, 200, "register {id}: {body}");
    }

    /// Registers a service definition given as JSON (Meta, Tags, a TCP check, ...).
    pub fn register_json(&self, def: &str) {
        let (code, body) = self.http("PUT", "/v1/agent/service/register", Some(def));
        assert_eq!(code, 200, "register {def}: {body}");
    }

    pub fn deregister(&self, id: &str) {
        let (code, body) = self.http("PUT", &format!("/v1/agent/service/deregister/{id}"), None);
        assert_eq!(code, 200, "deregister {id}: {body}");
    }
}

impl Drop for ConsulAgent {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
