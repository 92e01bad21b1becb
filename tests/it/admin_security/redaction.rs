//! Secrets in URLs (userinfo, query values) never show in /admin/config, logs or `validate`,
//! and `validate` refuses a non-loopback admin bind without a token.

use std::time::{Duration, Instant};

use super::{admin_get, TOKEN};
use crate::support::*;

/// Runs `hexgate validate` on `yaml` with `env` (HEXGATE_ADMIN_TOKEN removed unless given):
/// the exit code and stdout and stderr together.
fn validate(yaml: &str, env: &[(&str, &str)]) -> (i32, String) {
    let (code, stdout, stderr) = validate_yaml(yaml, env);
    (code, format!("{stdout}{stderr}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn urls_with_credentials_are_redacted_in_admin_config_and_logs() {
    let b = TestBackend::start(Behaviour::Hello).await;
    // Nothing listens on these ports: the JWKS fetch and the Consul watch fail and are logged.
    let dead = free_port();
    let extra = format!(
        "authentication:\n  enabled: true\n  jwksUrl: \"http://jwksuser:jwkspass@127.0.0.1:{dead}/jwks.json?api_key=jwks-query-secret&v=1\"\n\
         consul:\n  address: \"http://consuluser:consulpass@127.0.0.1:{dead}\"\n\
         redis:\n  address: \"127.0.0.1:{dead}\"\n  username: redisuser\n  password: \"redis-password-field\"\n"
    );
    let yaml = format!(
        "gatewayPort: \"{{port}}\"\ngatewayBind: 127.0.0.1\nadminPort: \"{{admin}}\"\n{extra}services:\n  - name: s\n    path: /\n    backends: [\"{}\"]\n  - name: d\n    path: /d/\n    consulServiceName: d\n",
        b.url()
    );
    let gw = Gateway::start(&yaml).await;
    let secrets = [
        "jwksuser",
        "jwkspass",
        "jwks-query-secret",
        "consuluser",
        "consulpass",
        "redis-password-field",
    ];

    let cfg = admin_get(gw.admin_port, "/admin/config", None).await;
    assert_eq!(cfg.status, 200, "{}", cfg.body);
    for s in secrets {
        assert!(
            !cfg.body.contains(s),
            "/admin/config shows {s}:\n{}",
            cfg.body
        );
    }
    assert!(
        cfg.body.contains(&format!(
            "http://<redacted>@127.0.0.1:{dead}/jwks.json?api_key=<redacted>&v=<redacted>"
        )),
        "{}",
        cfg.body
    );
    assert!(
        cfg.body
            .contains(&format!("http://<redacted>@127.0.0.1:{dead}\"")),
        "consul.address: {}",
        cfg.body
    );

    // The JWKS refresh and the Consul watch fail and say so, with the URLs redacted.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(gw.log().contains("JWKS refresh failed") && gw.log().contains("Consul query failed")) {
        assert!(
            Instant::now() < deadline,
            "failures not logged:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = gw.log();
    for s in secrets {
        assert!(!log.contains(s), "the log shows {s}:\n{log}");
    }
    assert!(log.contains("<redacted>"), "{log}");
}

#[test]
fn validate_never_prints_url_credentials() {
    // A backend URL with userinfo is refused; the message shows it redacted.
    let (code, out) = validate(
        "services:\n  - name: s\n    path: /\n    backends: [\"http://backuser:hunter2pass@127.0.0.1:8080\"]\n",
        &[],
    );
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("services[0]"), "{out}");
    assert!(out.contains("<redacted>@127.0.0.1:8080"), "{out}");
    assert!(
        !out.contains("hunter2pass") && !out.contains("backuser"),
        "{out}"
    );

    // With a query and a raw '/' in the password.
    let (code, out) = validate(
        "services:\n  - name: s\n    path: /\n    backends: [\"http://u:hunter2/pass@127.0.0.1:8080/?key=qsecret\"]\n",
        &[],
    );
    assert_eq!(code, 2, "{out}");
    assert!(
        !out.contains("hunter2") && !out.contains("qsecret"),
        "{out}"
    );

    // A bad Consul address with userinfo.
    let (code, out) = validate(
        "consul: {address: \"ftp://cuser:cpass@\"}\nservices:\n  - name: s\n    path: /\n    backends: [\"http://127.0.0.1:8080\"]\n",
        &[],
    );
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("consul.address"), "{out}");
    assert!(!out.contains("cpass") && !out.contains("cuser"), "{out}");

    // A valid config naming URLs with secrets: the summary shows none of them.
    let (code, out) = validate(
        "consul: {address: \"http://cuser:cpass@127.0.0.1:8500\"}\nauthentication: {enabled: true, jwksUrl: \"https://ju:jpass@idp.example/jwks?api_key=jq\"}\nservices:\n  - name: s\n    path: /\n    backends: [\"http://127.0.0.1:8080\"]\n",
        &[],
    );
    assert_eq!(code, 0, "{out}");
    for s in ["cpass", "cuser", "jpass", "api_key=jq"] {
        assert!(!out.contains(s), "{s} in {out}");
    }
}

#[test]
fn validate_refuses_a_non_loopback_admin_bind_without_a_token() {
    let yaml = "adminBind: 0.0.0.0\nservices:\n  - name: s\n    path: /\n    backends: [\"http://127.0.0.1:8080\"]\n";
    let (code, out) = validate(yaml, &[]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("adminBind"), "{out}");
    assert!(out.contains("token"), "{out}");

    // Any token source makes it acceptable.
    let (code, out) = validate(&format!("adminToken: \"{TOKEN}\"\n{yaml}"), &[]);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains(TOKEN), "{out}");
    let (code, out) = validate(yaml, &[("HEXGATE_ADMIN_TOKEN", "from-env")]);
    assert_eq!(code, 0, "{out}");
    // A loopback adminBind needs none.
    let (code, out) = validate(&yaml.replace("0.0.0.0", "127.0.0.1"), &[]);
    assert_eq!(code, 0, "{out}");
}
