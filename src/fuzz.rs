//! Fuzz targets for the untrusted-input paths: the path normaliser (every request path), the
//! config reader and validator (every config file and KV value) and the token verifier.
//!
//! Each target's property lives here as a `check_*` function that panics when it is broken. Two
//! drivers call them:
//! - coverage-guided: the cargo-fuzz crate in `fuzz/` (libFuzzer, `--sanitizer none` on the stable
//!   toolchain), run for a bounded time per target by `scripts/fuzz.sh SECONDS`;
//! - bounded random mutation in `cargo test` (`targets` below and `auth/tests.rs`): a fixed-seed
//!   budget in `make test`; `HEXGATE_FUZZ_SECONDS` and `HEXGATE_FUZZ_SEED` run it longer
//!   (`scripts/fuzz.sh --budget SECONDS`).
//!
//! A failure found either way becomes a regression case in the module's tests.

use std::time::Duration;

use crate::auth::jwt::{self, Policy, SigCheck, TokenError};
use crate::auth::keys::{self, Alg, Key};
use crate::auth::tools;
use crate::proxy::route::normalize_path;

/// The normaliser's properties for any input: no panic; a normalised path is absolute, has no
/// empty, `.` or `..` segments, no encoded dot segment, and normalising it again changes nothing.
pub fn check_path(path: &str) {
    let Ok(out) = normalize_path(path) else {
        return;
    };
    assert!(out.starts_with('/'), "not absolute: {out}");
    let body = out.strip_prefix('/').unwrap_or(&out);
    let segments: Vec<&str> = body.split('/').collect();
    for (n, seg) in segments.iter().enumerate() {
        assert!(*seg != "." && *seg != "..", "dot segment survived: {out}");
        assert!(
            !seg.is_empty() || n + 1 == segments.len(),
            "empty segment: {out}"
        );
        let lower = seg.to_ascii_lowercase();
        assert!(
            lower != "%2e" && lower != "%2e%2e" && lower != ".%2e" && lower != "%2e.",
            "encoded dot segment survived: {out}"
        );
    }
    let again = normalize_path(&out).expect("a normalised path normalises");
    assert_eq!(again, out, "not idempotent");
}

/// The config reader's properties for any text: no panic, and every error names the file and
/// says something.
pub fn check_config(text: &str) {
    if let Err(errs) = crate::config::parse(text, "fuzz.yaml") {
        assert!(!errs.0.is_empty(), "an error without a message");
        for e in &errs.0 {
            assert_eq!(e.file, "fuzz.yaml");
            assert!(!e.message.is_empty());
        }
    }
}

/// A key pair, a policy and one valid token: the token target's fixed world.
pub struct TokenTarget {
    /// A valid EdDSA token for consumer `alice`, the seed that mutations start from.
    pub token: String,
    keys: Vec<Key>,
    policy: Policy,
    /// The verification time (the token expires 100 s after it).
    pub now: u64,
}

impl TokenTarget {
    pub fn new() -> TokenTarget {
        let (private, public) = tools::generate(Alg::EdDSA).expect("generate a key");
        let signing = tools::SigningKey::from_pem(&private).expect("read the key");
        let keys = keys::from_pem(&public, "t").expect("read the public key");
        let policy = Policy {
            algorithms: vec![Alg::EdDSA, Alg::RS256],
            issuer: None,
            audience: None,
            leeway: Duration::from_secs(0),
            require_exp: true,
            consumer_claim: "sub".into(),
        };
        let now = 1_800_000_000;
        let token = tools::sign_token(
            &signing,
            Alg::EdDSA,
            None,
            &serde_json::json!({"sub": "alice", "exp": now + 100}),
        )
        .expect("sign a token");
        TokenTarget {
            token,
            keys,
            policy,
            now,
        }
    }

    /// Signature, then claims, as the gateway checks a bearer token.
    pub fn verify(&self, token: &str) -> Result<jwt::Verified, TokenError> {
        let parts = jwt::split(token)?;
        match jwt::check_signature(&parts, &self.policy, &self.keys) {
            SigCheck::Ok => jwt::check_claims(&parts.payload, &self.policy, self.now),
            SigCheck::UnknownKid(k) => Err(TokenError::UnknownKid(k)),
            SigCheck::Failed(e) => Err(e),
        }
    }

    /// The verifier's property for any input: no panic, and nothing but the valid token (up to
    /// base64url's unused trailing bits, which decode the same) is accepted.
    pub fn check(&self, candidate: &str) {
        if candidate == self.token {
            return;
        }
        if let Ok(v) = self.verify(candidate) {
            assert_eq!(v.consumer, "alice", "altered token accepted: {candidate}");
            let a = jwt::split(candidate).expect("it verified, so it splits");
            let b = jwt::split(&self.token).expect("the valid token splits");
            assert_eq!(
                (a.payload, a.signature),
                (b.payload, b.signature),
                "altered token accepted: {candidate}"
            );
        }
    }
}

impl Default for TokenTarget {
    fn default() -> Self {
        Self::new()
    }
}

/// How long a bounded fuzz test runs: a number of cases, or a time from the environment.
#[cfg(test)]
pub(crate) struct Budget {
    deadline: Option<std::time::Instant>,
    cases: u64,
    pub seed: u64,
}

#[cfg(test)]
impl Budget {
    pub(crate) fn from_env(default_cases: u64) -> Budget {
        let seconds = std::env::var("HEXGATE_FUZZ_SECONDS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok());
        let seed = std::env::var("HEXGATE_FUZZ_SEED")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(7);
        Budget {
            deadline: seconds.map(|s| std::time::Instant::now() + Duration::from_secs(s)),
            cases: default_cases,
            seed,
        }
    }

    /// Whether case number `i` should run.
    pub(crate) fn more(&self, i: u64) -> bool {
        match self.deadline {
            Some(d) => i % 256 != 0 || std::time::Instant::now() < d,
            None => i < self.cases,
        }
    }
}

/// Runs one case; a panic is reported with the seed and the input.
#[cfg(test)]
pub(crate) fn case<T: std::fmt::Debug>(seed: u64, input: &T, f: impl FnOnce()) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err() {
        panic!("fuzz case failed (HEXGATE_FUZZ_SEED={seed}); input: {input:?}");
    }
}

#[cfg(test)]
mod targets {
    use super::*;

    const PATH_PIECES: &[&str] = &[
        "/",
        "//",
        ".",
        "..",
        "%2e",
        "%2E",
        "%2f",
        "%2F",
        "%5c",
        "%25",
        "%",
        "%%",
        "%g0",
        "%0",
        "a",
        "users",
        "%75",
        "%7E",
        "~",
        "é",
        "%c0%ae",
        "%c0%af",
        "%e0%80%ae",
        "%00",
        "\\",
        ";",
        "%3b",
        "?",
        "#",
        " ",
        "\u{fffd}",
        "%ff",
        "-",
        "_",
    ];

    fn random_path(rng: &mut fastrand::Rng) -> String {
        let mut p = String::from("/");
        for _ in 0..rng.usize(0..12) {
            p.push_str(PATH_PIECES[rng.usize(..PATH_PIECES.len())]);
        }
        p
    }

    /// No panic; a normalised path is absolute, has no empty, `.` or `..` segments, no
    /// encoded dot or slash that would decode into one, and normalising it again changes nothing.
    #[test]
    fn normaliser_invariants_hold_for_random_paths() {
        let budget = Budget::from_env(50_000);
        let mut rng = fastrand::Rng::with_seed(budget.seed);
        let mut i = 0;
        while budget.more(i) {
            i += 1;
            let path = random_path(&mut rng);
            case(budget.seed, &path, || check_path(&path));
        }
        eprintln!("normaliser: {i} random paths, seed {}", budget.seed);
        assert!(i > 0);
    }

    /// A config exercising every section, used as the seed for mutations.
    const TEMPLATE: &str = r#"gatewayPort: "8000"
gatewayBind: 127.0.0.1
adminPort: "9090"
adminBind: 127.0.0.1
healthCheckInterval: 5
healthCheckPath: /healthz
healthCheckTimeout: 2s
maxHeaderSize: 16k
maxBodySize: 10m
maxConnections: 1000
accessLog: true
shutdownTimeout: 10s
trustedProxies: ["127.0.0.1/32", "10.0.0.0/8"]
loadBalancing: roundRobin
retries: 2
timeouts: {connect: 1s, request: 30s, idle: 60s, headerRead: 10s}
rateLimitHeaders: both
rateLimiting: {enabled: true, ratePerSecond: 10, burst: 20, key: ip}
authentication:
  enabled: true
  publicKeyPath: ./config/public.pem
  algorithms: [RS256, ES256]
  issuer: https://issuer.example
  audience: api
  leeway: 30s
  consumerClaim: sub
tls: {enabled: false, httpsPort: "8443", certFile: ./c.pem, keyFile: ./k.pem}
redis: {address: "127.0.0.1:6379", password: "", db: 0, timeout: 100ms, failureMode: open}
consul: {address: "127.0.0.1:8500", datacenter: dc1}
services:
  - name: users
    path: /users/
    stripPath: true
    backends: ["http://127.0.0.1:8081", "http://127.0.0.1:8082"]
    hosts: ["api.example.com", "*.example.org"]
    methods: [GET, POST]
    maxBodySize: 1k
    timeouts: {request: 5s}
    quota: {enabled: true, limit: 1000, period: 24h, key: consumer}
    rateLimiting: {enabled: true, ratePerSecond: 5, burst: 5, key: "header:x-api-key"}
  - name: products
    path: /products
    pathType: exact
    consulServiceName: product-service
    authentication: {enabled: false}
"#;

    const VALUES: &[&str] = &[
        "",
        "~",
        "null",
        "0",
        "-1",
        "1.5",
        "1e309",
        "99999999999999999999999",
        "true",
        "abc",
        "[]",
        "{}",
        "[1, [2]]",
        "{a: 1}",
        "\"\"",
        "'é'",
        "\"\\u0000\"",
        "1h",
        "-5s",
        "0s",
        "1d",
        "100000000000000000000d",
        "9999999h",
        "http://",
        "//",
        "/",
        "*a",
        "&a x",
        "!!binary x",
        "\"1.2.3.4/99\"",
        "[RS256, none, HS256]",
        "\"*.\"",
        "\"header:\"",
        "16p",
        "-16k",
        "\"65536\"",
        "\"0\"",
    ];

    /// Every scalar of the template replaced in turn by odd values, plus random byte-level
    /// mutations: the reader never panics, and every error names the file and a line.
    #[test]
    fn config_reader_never_panics_on_mutated_configs() {
        assert!(
            crate::config::parse(TEMPLATE, "fuzz.yaml").is_ok(),
            "template must be valid: {:?}",
            crate::config::parse(TEMPLATE, "fuzz.yaml")
                .err()
                .map(|e| e.to_string())
        );
        let lines: Vec<&str> = TEMPLATE.lines().collect();
        let check = check_config;
        // Field by field: each `key: value` line gets each odd value.
        let mut fields = 0;
        for (n, line) in lines.iter().enumerate() {
            let Some((key, _)) = line.split_once(": ") else {
                continue;
            };
            for v in VALUES {
                let mut m = lines.clone();
                let replaced = format!("{key}: {v}");
                m[n] = &replaced;
                let text = m.join("\n");
                fields += 1;
                case(0, &text, || check(&text));
            }
        }
        // Random byte-level mutations.
        let budget = Budget::from_env(3_000);
        let mut rng = fastrand::Rng::with_seed(budget.seed);
        let alphabet = b" :-[]{},\"'#&*!|>%@`\n\t0123456789abcdefghijklmnopqrstuvwxyz./";
        let mut i = 0;
        while budget.more(i) {
            i += 1;
            let mut bytes = TEMPLATE.as_bytes().to_vec();
            for _ in 0..rng.usize(1..8) {
                let at = rng.usize(..bytes.len());
                match rng.u8(..4) {
                    0 => {
                        bytes.remove(at);
                    }
                    1 => bytes.insert(at, alphabet[rng.usize(..alphabet.len())]),
                    2 => bytes[at] = alphabet[rng.usize(..alphabet.len())],
                    _ => {
                        let end = (at + rng.usize(1..40)).min(bytes.len());
                        let piece = bytes[at..end].to_vec();
                        let to = rng.usize(..bytes.len());
                        bytes.splice(to..to, piece);
                    }
                }
            }
            let text = String::from_utf8_lossy(&bytes).into_owned();
            case(budget.seed, &text, || check(&text));
        }
        eprintln!(
            "config: {fields} field-by-field variants, {i} mutated files, seed {}",
            budget.seed
        );
    }
}
