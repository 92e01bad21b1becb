//! `validate` against `run`, as a property: for generated configs and the files they name (key
//! files good, missing, a private key or garbage; TLS certificates good, missing, garbage or
//! with a key of another certificate; admin token files good, missing or empty), `hexgate
//! validate` accepts exactly the configs `hexgate run` starts with, and where both refuse they
//! report the same problems at the same file:line: key.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

/// The problems a command reported: its stderr lines of the form `PATH:LINE: ...`.
fn problems(stderr: &str, config: &Path) -> Vec<String> {
    let prefix = config.display().to_string();
    let mut v: Vec<String> = stderr
        .lines()
        .filter(|l| {
            l.strip_prefix(&prefix)
                .and_then(|rest| rest.strip_prefix(':'))
                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
        })
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

/// Whether the admin listener on `port` answers /healthz with 200.
fn healthy(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 200")
}

/// `hexgate run --config FILE`: Ok(()) once it serves, or Err(stderr) when it exits first.
fn run_outcome(config: &Path, admin: u16) -> Result<(), String> {
    let mut child = Command::new(bin())
        .args(["run", "--config"])
        .arg(config)
        .env_remove("HEXGATE_ADMIN_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start hexgate");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(_status) = child.try_wait().expect("wait") {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            return Err(err);
        }
        if healthy(admin) {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{}: neither served nor exited in 15 s", config.display());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

#[test]
fn validate_accepts_exactly_what_run_starts() {
    let dir = temp_dir("compile-diff");
    hexgate_keygen(&dir.join("keys"));
    let (cert_a, key_a) = self_signed_cert(&dir, "a");
    let (_, key_b) = self_signed_cert(&dir, "b");
    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, "-----BEGIN NOTHING-----\nnot base64\n").unwrap();
    let token = dir.join("token");
    std::fs::write(&token, "s3cret-token\n").unwrap();
    let empty = dir.join("empty");
    std::fs::write(&empty, "\n").unwrap();
    let missing = dir.join("missing.pem");
    let public = dir.join("keys/public.pem");
    let private = dir.join("keys/private.pem");

    let seed: u64 = std::env::var("HEXGATE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_c0de);
    let mut rng = fastrand::Rng::with_seed(seed);
    let (mut started, mut refused) = (0, 0);
    for case in 0..24 {
        let (port, admin, https) = (free_port(), free_port(), free_port());
        let mut yaml = format!(
            "gatewayPort: \"{port}\"\ngatewayBind: 127.0.0.1\nadminPort: \"{admin}\"\nadminBind: 127.0.0.1\n"
        );
        // Good choices are repeated, so about one case in six starts.
        let key_file = [
            None,
            None,
            Some(&public),
            Some(&public),
            Some(&missing),
            Some(&private),
            Some(&garbage),
        ][rng.usize(..7)];
        if let Some(k) = key_file {
            yaml += &format!(
                "authentication:\n  enabled: true\n  publicKeyPath: {}\n",
                k.display()
            );
        }
        let tls = [
            None,
            None,
            Some((&cert_a, &key_a)),
            Some((&cert_a, &key_a)),
            Some((&missing, &key_a)),
            Some((&cert_a, &key_b)),
            Some((&garbage, &key_a)),
            Some((&cert_a, &missing)),
        ][rng.usize(..8)];
        if let Some((c, k)) = tls {
            yaml += &format!(
                "tls:\n  enabled: true\n  httpsPort: \"{https}\"\n  certFile: {}\n  keyFile: {}\n",
                c.display(),
                k.display()
            );
        }
        let admin_token = [None, None, Some(&token), Some(&missing), Some(&empty)][rng.usize(..5)];
        if let Some(t) = admin_token {
            yaml += &format!("adminTokenFile: {}\n", t.display());
        }
        yaml += "services:\n  - name: s\n    path: /s/\n    backends: [\"http://127.0.0.1:9\"]\n";
        let config = dir.join(format!("case{case}.yaml"));
        std::fs::write(&config, &yaml).unwrap();

        let out = Command::new(bin())
            .arg("validate")
            .arg(&config)
            .env_remove("HEXGATE_ADMIN_TOKEN")
            .output()
            .expect("run hexgate validate");
        let validated = out.status.success();
        let validate_problems = problems(&String::from_utf8_lossy(&out.stderr), &config);
        match run_outcome(&config, admin) {
            Ok(()) => {
                started += 1;
                assert!(
                    validated,
                    "case {case} (seed {seed}): run starts, validate refuses:\n{yaml}\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Err(stderr) => {
                refused += 1;
                assert!(
                    !validated,
                    "case {case} (seed {seed}): validate accepts, run refuses:\n{yaml}\n{stderr}"
                );
                let run_problems = problems(&stderr, &config);
                assert!(
                    !run_problems.is_empty(),
                    "case {case}: run names no file:line: key:\n{stderr}"
                );
                assert_eq!(
                    validate_problems, run_problems,
                    "case {case} (seed {seed}): validate and run report different problems:\n{yaml}"
                );
            }
        }
    }
    assert!(
        started > 0 && refused > 0,
        "seed {seed}: {started} started, {refused} refused: the cases must cover both"
    );
    eprintln!("compile differential: {started} started, {refused} refused (seed {seed})");
}
