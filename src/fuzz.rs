//! Fuzz targets for the untrusted-input paths: the path normaliser and the escaped-separator
//! policy (every request path), host canonicalisation (every Host and `:authority`), the
//! header-field policy (every request's header names), the config reader and validator (every
//! config file and KV value) and the token verifier.
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
use crate::rules::headers::{HeaderPolicy, UnderscoreHeaders};
use crate::rules::host::{self, canonicalize};
use crate::rules::path::{normalize_path, normalize_path_decoding_separators, scan};

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
    // The separator policy: `%00` never passes; with `escapedSlashes: decode` no encoded or
    // raw separator survives, so a backend that decodes them sees the path we routed.
    let Ok(esc) = scan(path) else { return };
    if !esc.separators {
        assert_eq!(
            normalize_path_decoding_separators(path).ok(),
            Some(out.clone()),
            "decoding changed a path without separators"
        );
    }
    if let Ok(dec) = normalize_path_decoding_separators(path) {
        let d = dec.to_ascii_uppercase();
        assert!(
            !d.contains("%2F") && !d.contains("%5C") && !d.contains('\\'),
            "a separator survived decoding: {dec}"
        );
        assert!(!scan(&dec).expect("no %00 after decoding").separators);
        assert_eq!(
            normalize_path(&dec).ok().as_deref(),
            Some(&*dec),
            "decoded path not normal"
        );
    }
}

/// Host canonicalisation's properties for any bytes: no panic; a canonical host is lower-case
/// ASCII of the allowed bytes, canonical again, and its variants (upper case, one trailing dot,
/// the default port) canonicalise to it, so they match exactly the routes it matches.
pub fn check_host(raw: &[u8]) {
    let Ok(a) = canonicalize(raw, 80) else {
        return;
    };
    let c = a.as_str();
    assert!(
        c.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.:[]".contains(&b)),
        "bad byte in canonical host {c:?}"
    );
    assert!(!a.host().is_empty() && !a.host().ends_with('.'), "{c:?}");
    assert_eq!(
        canonicalize(c.as_bytes(), 80).as_ref(),
        Ok(&a),
        "not idempotent"
    );
    let patterns = ["admin.example.com", "*.example.com", a.host()];
    let mut variants = vec![c.to_ascii_uppercase()];
    if !a.host().starts_with('[') {
        let port = &c[a.host().len()..];
        variants.push(format!("{}.{port}", a.host()));
        variants.push(format!("{}.{port}", a.host().to_ascii_uppercase()));
        if port.is_empty() {
            variants.push(format!("{}.:80", a.host()));
        }
    } else if c.len() == a.host().len() {
        variants.push(format!("{c}:80"));
    }
    for v in variants {
        let b = canonicalize(v.as_bytes(), 80)
            .unwrap_or_else(|e| panic!("variant {v:?} of {c:?} refused: {e}"));
        assert_eq!(b, a, "variant {v:?} canonicalises differently");
        for p in patterns {
            assert_eq!(
                host::host_matches(p, b.host()),
                host::host_matches(p, a.host()),
                "variant {v:?} matches {p:?} differently"
            );
        }
    }
}

/// The header-field policy's property: under the default (`underscoreHeaders: drop`) no name
/// with `_` survives, and every other field does (HeaderMap removal may reorder names, and the
/// order of distinct names carries no meaning).
pub fn check_header_names(names: &[&[u8]]) {
    let mut map = http::HeaderMap::new();
    for n in names {
        if let Ok(name) = http::HeaderName::from_bytes(n) {
            map.append(name, http::HeaderValue::from_static("v"));
        }
    }
    let mut expected: Vec<String> = map
        .iter()
        .filter(|(n, _)| !n.as_str().contains('_') && *n != http::header::AUTHORIZATION)
        .map(|(n, _)| n.as_str().to_string())
        .collect();
    let policy = HeaderPolicy {
        max_count: 10_000,
        max_bytes: u64::MAX,
        underscores: UnderscoreHeaders::Drop,
    };
    if policy.apply(&mut map).is_err() {
        return; // refused outright: nothing reaches a backend
    }
    for n in map.keys() {
        assert!(!n.as_str().contains('_'), "{n} survived the default policy");
    }
    let mut kept: Vec<String> = map
        .iter()
        .filter(|(n, _)| *n != http::header::AUTHORIZATION)
        .map(|(n, _)| n.as_str().to_string())
        .collect();
    expected.sort();
    kept.sort();
    assert_eq!(kept, expected, "a field without '_' was lost");
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

    const HOST_PIECES: &[&str] = &[
        "a", "admin", "example", "com", ".", "..", ":", "80", "443", "8080", "65536", "0", "[",
        "]", "::1", "0:0::1", "@", "/", "%2e", "_", "-", "A", "ADMIN", "\u{e9}", " ", "\\", "?",
        "#", "*",
    ];

    /// Random hosts from pieces and random bytes: `check_host` holds.
    #[test]
    fn host_canonicalisation_invariants_hold_for_random_hosts() {
        let budget = Budget::from_env(50_000);
        let mut rng = fastrand::Rng::with_seed(budget.seed);
        let mut i = 0;
        let mut valid = 0;
        while budget.more(i) {
            i += 1;
            let raw: Vec<u8> = if rng.bool() {
                (0..rng.usize(0..6))
                    .flat_map(|_| HOST_PIECES[rng.usize(..HOST_PIECES.len())].bytes())
                    .collect()
            } else {
                (0..rng.usize(0..12)).map(|_| rng.u8(..)).collect()
            };
            valid += usize::from(canonicalize(&raw, 80).is_ok());
            case(budget.seed, &String::from_utf8_lossy(&raw), || {
                check_host(&raw)
            });
        }
        eprintln!(
            "hosts: {i} random hosts ({valid} valid), seed {}",
            budget.seed
        );
        assert!(
            valid > 0,
            "no valid host generated: the test checks nothing"
        );
    }

    /// Random header-name sets: no name with `_` survives the default policy.
    #[test]
    fn no_underscore_name_survives_the_default_policy() {
        let budget = Budget::from_env(20_000);
        let mut rng = fastrand::Rng::with_seed(budget.seed);
        const PIECES: &[&str] = &["x", "-", "_", "consumer", "id", "transfer", "encoding", "a"];
        let mut i = 0;
        while budget.more(i) {
            i += 1;
            let names: Vec<Vec<u8>> = (0..rng.usize(0..8))
                .map(|_| {
                    (0..rng.usize(1..5))
                        .flat_map(|_| PIECES[rng.usize(..PIECES.len())].bytes())
                        .collect()
                })
                .collect();
            let refs: Vec<&[u8]> = names.iter().map(Vec::as_slice).collect();
            case(budget.seed, &names, || check_header_names(&refs));
        }
        eprintln!("headers: {i} random name sets, seed {}", budget.seed);
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

    // The token path under mutation (moved here from the auth crate, which cannot name this one).
    use base64::Engine as _;

    /// Mutation fuzzing of the token path, bounded: no panic, and no altered token is ever accepted.
    #[test]
    fn mutated_tokens_never_verify_and_never_panic() {
        let target = crate::fuzz::TokenTarget::new();
        assert!(target.verify(&target.token).is_ok());
        let bytes = target.token.as_bytes().to_vec();
        let budget = crate::fuzz::Budget::from_env(20_000);
        let mut rng = fastrand::Rng::with_seed(budget.seed);
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ {}\"";
        let mut case = 0;
        while budget.more(case) {
            case += 1;
            let mut m = bytes.clone();
            match rng.u8(0..4) {
                0 => {
                    let i = rng.usize(..m.len());
                    m[i] = alphabet[rng.usize(..alphabet.len())];
                }
                1 => {
                    let i = rng.usize(..m.len());
                    m.truncate(i);
                }
                2 => {
                    let i = rng.usize(..m.len());
                    m.insert(i, alphabet[rng.usize(..alphabet.len())]);
                }
                _ => {
                    let i = rng.usize(..m.len());
                    let j = rng.usize(..m.len());
                    m.swap(i, j);
                }
            }
            let Ok(s) = String::from_utf8(m) else {
                continue;
            };
            crate::fuzz::case(budget.seed, &s, || target.check(&s));
        }
        eprintln!("tokens: {case} mutated tokens, seed {}", budget.seed);
    }

    #[test]
    fn algorithm_confusion_is_refused() {
        let target = crate::fuzz::TokenTarget::new();
        let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(r#"{"sub":"x","exp":9999999999}"#);
        for alg in ["none", "HS256", "HS512", "RS256", "ES256"] {
            let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(format!(r#"{{"alg":"{alg}"}}"#));
            let t = format!("{header}.{claims}.AAAA");
            assert!(target.verify(&t).is_err(), "{alg} accepted");
        }
    }
}
