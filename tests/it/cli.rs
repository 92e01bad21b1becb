//! `hexgate validate` and start-up refusals, as a user runs them.

use std::process::Command;

use crate::support::{bin, temp_dir};

fn validate(yaml: &str) -> (i32, String, String) {
    let dir = temp_dir("validate");
    let f = dir.join("config.yaml");
    std::fs::write(&f, yaml).unwrap();
    let out = Command::new(bin())
        .arg("validate")
        .arg(&f)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn seed_config_validates_unchanged() {
    for f in [
        "config/config.yaml",
        "config/config-static-backends.yaml",
        "config/config-consul.yaml",
    ] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(f);
        let out = Command::new(bin())
            .arg("validate")
            .arg(&path)
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
}

#[test]
fn bad_config_lists_every_problem_with_file_line_and_key() {
    let (code, _, err) = validate(
        "gatewayPort: \"8000\"\nservices:\n  - name: users\n    path: /users/\n    backend: [\"http://127.0.0.1:1\"]\n    loadBalancing: random\nhealthCheckInterval: 5q\n",
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
