//! `hexgate validate` and start-up refusals, as a user runs them.

use std::process::Command;

use crate::support::{bin, hexgate_keygen, temp_dir, validate_yaml};

/// The seed's configs validate unchanged. config.yaml names `./config/public.pem`, which the
/// walkthrough creates with `hexgate keygen --out config` first: validate checks the file as run
/// does, so it runs where that key exists, and refuses (at the key's line) where it does not.
#[test]
fn seed_config_validates_unchanged() {
    let work = temp_dir("seed");
    hexgate_keygen(&work.join("config"));
    let seed = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/config.yaml");
    let empty = temp_dir("seed-nokey");
    let out = Command::new(bin())
        .arg("validate")
        .arg(&seed)
        .current_dir(&empty)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "no key yet: {err}");
    assert!(
        err.contains("config.yaml:18: authentication.publicKeyPath: ")
            && err.contains("public.pem"),
        "{err}"
    );
    for f in [
        "config/config.yaml",
        "config/config-static-backends.yaml",
        "config/config-consul.yaml",
    ] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(f);
        let out = Command::new(bin())
            .arg("validate")
            .arg(&path)
            .current_dir(&work)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{f}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("OK: 2 service(s)"), "{stdout}");
        assert_eq!(stdout.lines().count(), 1, "one-line summary: {stdout}");
    }
    let _ = std::fs::remove_dir_all(&work);
    let _ = std::fs::remove_dir_all(&empty);
}

#[test]
fn bad_config_lists_every_problem_with_file_line_and_key() {
    let (code, _, err) = validate_yaml(
        "gatewayPort: \"8000\"\nservices:\n  - name: users\n    path: /users/\n    backend: [\"http://127.0.0.1:1\"]\n    loadBalancing: random\nhealthCheckInterval: 5q\n",
        &[],
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("config.yaml:5: services[0].backend: unknown key \"backend\" (did you mean \"backends\"?)"),
        "{err}"
    );
    assert!(
        err.contains(
            "config.yaml:6: services[0].loadBalancing: must be one of roundRobin, leastRequest"
        ),
        "{err}"
    );
    assert!(
        err.contains("config.yaml:7: healthCheckInterval: invalid duration"),
        "{err}"
    );
    assert!(
        err.contains("3 problem(s)") || err.contains("4 problem(s)"),
        "{err}"
    );
}

#[test]
fn missing_file_is_a_clear_error() {
    let out = Command::new(bin())
        .args(["validate", "/nonexistent/hexgate.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/hexgate.yaml") && err.contains("cannot read file"),
        "{err}"
    );
}

#[test]
fn run_with_a_missing_key_file_names_it() {
    // The seed config points at ./config/public.pem; run from a directory without it.
    let dir = temp_dir("nokey");
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/config.yaml");
    let out = Command::new(bin())
        .arg("run")
        .arg("--config")
        .arg(&path)
        .current_dir(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("public.pem")
            && err.contains("cannot read public key")
            && err.contains("authentication"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn run_with_bad_config_exits_non_zero() {
    let dir = temp_dir("badrun");
    let f = dir.join("c.yaml");
    std::fs::write(&f, "services:\n  - name: a\n").unwrap();
    let out = Command::new(bin())
        .arg("run")
        .arg("--config")
        .arg(&f)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("c.yaml:2: services[0].path: required"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The compile step is shared: for each config `run` refuses because of a file it names,
/// `validate` (and `run`) say so with the file, the line and the key that named the file.
#[test]
fn validate_refuses_exactly_what_run_refuses() {
    crate::support::require_tool("openssl");
    let dir = temp_dir("compile");
    hexgate_keygen(&dir);
    for n in ["a-", "b-"] {
        crate::support::self_signed_cert(&dir, n);
    }
    let d = dir.display();
    let head = "gatewayPort: \"0\"\nadminPort: \"0\"\ngatewayBind: 127.0.0.1\nservices:\n  - name: s\n    path: /\n    backends: [\"http://127.0.0.1:1\"]\n";
    let cases = [
        (
            format!("{head}authentication:\n  enabled: true\n  publicKeyPath: \"{d}/missing.pem\"\n"),
            ":10: authentication.publicKeyPath: ",
            "cannot read public key",
        ),
        (
            format!("{head}authentication:\n  enabled: true\n  publicKeyPath: \"{d}/private.pem\"\n"),
            ":10: authentication.publicKeyPath: ",
            "private.pem",
        ),
        (
            format!("{head}authentication:\n  enabled: true\n  publicKeys:\n    - \"{d}/public.pem\"\n    - \"{d}/private.pem\"\n"),
            ":12: authentication.publicKeys[1]: ",
            "private.pem",
        ),
        (
            format!("{head}tls:\n  enabled: true\n  httpsPort: \"1\"\n  certFile: \"{d}/none.pem\"\n  keyFile: \"{d}/a-key.pem\"\n"),
            ":11: tls.certFile: ",
            "none.pem",
        ),
        (
            format!("{head}tls:\n  enabled: true\n  httpsPort: \"1\"\n  certFile: \"{d}/a-cert.pem\"\n  keyFile: \"{d}/b-key.pem\"\n"),
            ":12: tls.keyFile: ",
            "does not match the certificate",
        ),
        (
            format!("{head}adminTokenFile: \"{d}/no-token\"\n"),
            ":8: adminTokenFile: ",
            "no-token",
        ),
    ];
    for (yaml, at, what) in &cases {
        let (code, out, err) = validate_yaml(yaml, &[]);
        assert_eq!(code, 2, "validate accepted:\n{yaml}\n{out}{err}");
        assert!(
            err.contains(at) && err.contains(what),
            "validate said:\n{err}\nfor\n{yaml}"
        );
        let f = dir.join("run.yaml");
        std::fs::write(&f, yaml).unwrap();
        let run = Command::new(bin())
            .args(["run", "--config"])
            .arg(&f)
            .output()
            .unwrap();
        let run_err = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(2), "run: {run_err}");
        assert!(
            run_err.contains(at) && run_err.contains(what),
            "run said:\n{run_err}"
        );
    }
    // And the same files, right, are accepted by both (validate only: run would serve).
    let good = format!("{head}authentication:\n  enabled: true\n  publicKeyPath: \"{d}/public.pem\"\ntls:\n  enabled: true\n  httpsPort: \"1\"\n  certFile: \"{d}/a-cert.pem\"\n  keyFile: \"{d}/a-key.pem\"\n");
    let (code, out, err) = validate_yaml(&good, &[]);
    assert_eq!(code, 0, "{out}{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
