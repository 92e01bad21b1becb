//! JWT authentication: the key set (PEM files and/or a JWKS URL, refreshed in the background),
//! the verified-token cache, and the per-request check that yields the consumer identity.

pub mod apikeys;
pub mod cache;
pub mod jwt;
pub mod keys;
pub mod tools;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION};

use hexgate_config::Authentication;
use hexgate_http::clock::Clock;
use hexgate_metrics::Registry;
use jwt::{Policy, SigCheck, TokenError};
use keys::{Alg, Key};

/// Header carrying the verified consumer id upstream.
pub const X_CONSUMER_ID: HeaderName = HeaderName::from_static("x-consumer-id");
/// At most one on-demand JWKS refresh (unknown kid) per this interval.
const MIN_REFRESH_GAP: Duration = Duration::from_secs(5);
const DEFAULT_JWKS_MAX_AGE: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("401 Unauthorized: Missing Authorization header")]
    Missing,
    #[error("Authorization header must be \"Bearer <token>\"")]
    BadHeader,
    /// A route that takes API keys only, and none came (the header's name).
    #[error("401 Unauthorized: Missing {0} header")]
    MissingApiKey(String),
    #[error("{0}")]
    ApiKey(#[from] apikeys::ApiKeyError),
    #[error("{0}")]
    Token(#[from] TokenError),
}

impl AuthError {
    pub fn label(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::BadHeader => "malformed",
            AuthError::MissingApiKey(_) => "apikey_missing",
            AuthError::ApiKey(k) => k.label(),
            AuthError::Token(t) => t.label(),
        }
    }
}

/// Labels of `hexgate_auth_failures_total{reason}` (declared with the metrics).
pub use hexgate_metrics::AUTH_REASONS as REASONS;

/// Who the request is from, and the headers that say so upstream.
#[derive(Debug, Clone)]
pub struct Identity {
    pub consumer: Arc<str>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Scopes granted: a JWT's `scope` (space-separated) or `scp` (array) claim, or an API
    /// key's `scopes`.
    pub scopes: Vec<String>,
    /// The consumer's plan, when the credential names one.
    pub plan: Option<Arc<str>>,
    /// The API key's `id`, for a request authenticated by key.
    pub key_id: Option<Arc<str>>,
}

impl Identity {
    /// The scopes of `required` this identity lacks.
    pub fn missing_scopes<'a>(&self, required: &'a [String]) -> Vec<&'a str> {
        required
            .iter()
            .filter(|r| !self.scopes.iter().any(|s| s == *r))
            .map(String::as_str)
            .collect()
    }
}

pub struct KeySet {
    pub keys: Vec<Key>,
    pub generation: u64,
}

/// What an authenticator is built from: the settings and the contents of the key files. A reload
/// with an equal fingerprint keeps the running authenticator (its JWKS and token caches).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fingerprint {
    pub settings: Authentication,
    pub key_files: Vec<String>,
}

pub struct Authenticator {
    /// Config and key-file contents this was built from; equal fingerprints reuse the instance.
    pub fingerprint: Fingerprint,
    policy: Policy,
    pem_keys: Vec<Key>,
    keys: ArcSwap<KeySet>,
    cache: cache::TokenCache,
    jwks_url: Option<String>,
    refresh: tokio::sync::Mutex<Option<Instant>>,
    forward_claims: Vec<(String, HeaderName)>,
    /// `planClaim`: the claim naming the consumer's plan.
    plan_claim: Option<String>,
    pub strip_authorization: bool,
    metrics: Arc<Registry>,
    /// Seconds until the next scheduled JWKS refresh (from Cache-Control max-age).
    refresh_after_secs: AtomicU64,
    /// The time tokens are checked against (`exp`, `nbf`, the verified-token cache).
    clock: Clock,
}

impl Authenticator {
    /// The authenticator for `cfg` with the keys the compile step read from its key files
    /// (`fingerprint`: those settings and file contents). Algorithm names were checked there; a
    /// JWKS URL starts its refresh task on the current runtime.
    pub fn new(
        cfg: &Authentication,
        fingerprint: Fingerprint,
        pem_keys: Vec<Key>,
        metrics: Arc<Registry>,
    ) -> Arc<Authenticator> {
        let algorithms = cfg
            .algorithms
            .iter()
            .filter_map(|a| Alg::parse(a))
            .collect();
        let forward_claims = cfg
            .forward_claims
            .iter()
            .filter_map(|(c, h)| {
                HeaderName::from_bytes(h.as_bytes())
                    .ok()
                    .map(|h| (c.clone(), h))
            })
            .collect();
        let auth = Arc::new(Authenticator {
            fingerprint,
            policy: Policy {
                algorithms,
                issuer: cfg.issuer.clone(),
                audience: cfg.audience.clone(),
                leeway: cfg.leeway,
                require_exp: cfg.require_exp,
                consumer_claim: cfg.consumer_claim.clone(),
            },
            keys: ArcSwap::from_pointee(KeySet {
                keys: pem_keys.clone(),
                generation: 1,
            }),
            pem_keys,
            cache: cache::TokenCache::new(),
            jwks_url: cfg.jwks_url.clone(),
            refresh: tokio::sync::Mutex::new(None),
            forward_claims,
            plan_claim: cfg.plan_claim.clone(),
            strip_authorization: cfg.strip_authorization,
            metrics,
            refresh_after_secs: AtomicU64::new(DEFAULT_JWKS_MAX_AGE.as_secs()),
            clock: Clock::System,
        });
        if auth.jwks_url.is_some() {
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(refresh_loop(Arc::downgrade(&auth)));
            }
        }
        auth
    }

    /// The same authenticator checking tokens against `clock` (tests: a manual clock, so token
    /// expiry is tested without sleeping). Call before the authenticator is shared.
    pub fn with_clock(mut self: Arc<Self>, clock: Clock) -> Arc<Self> {
        if let Some(a) = Arc::get_mut(&mut self) {
            a.clock = clock;
        }
        self
    }

    /// Header names that only the gateway may set upstream.
    pub fn identity_headers(&self) -> Vec<HeaderName> {
        std::iter::once(X_CONSUMER_ID)
            .chain(self.forward_claims.iter().map(|(_, h)| h.clone()))
            .collect()
    }

    pub fn key_count(&self) -> usize {
        self.keys.load().keys.len()
    }

    /// Checks the request's bearer token. RSA work is skipped for tokens already verified.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Arc<Identity>, AuthError> {
        self.authenticate_noting(headers, &mut false).await
    }

    /// [`Self::authenticate`], setting `cached` when the verified-token cache answered (no
    /// signature was checked): what a trace's authentication span reports.
    pub async fn authenticate_noting(
        &self,
        headers: &HeaderMap,
        cached: &mut bool,
    ) -> Result<Arc<Identity>, AuthError> {
        let value = headers.get(AUTHORIZATION).ok_or(AuthError::Missing)?;
        let token = bearer(value)?;
        if token.len() > jwt::MAX_TOKEN_LEN {
            return Err(TokenError::TooLarge.into());
        }
        let now = self.clock.now_secs();
        let key_generation = self.keys.load().generation;
        if let Some(hit) = self
            .cache
            .get(token, key_generation, now, self.policy.leeway)?
        {
            *cached = true;
            return Ok(hit);
        }
        let parts = jwt::split(token)?;
        let mut outcome = {
            let set = self.keys.load();
            jwt::check_signature(&parts, &self.policy, &set.keys)
        };
        if let SigCheck::UnknownKid(_) = outcome {
            // Boxed: the JWKS fetch is rare and its state (an HTTP client call) is large; inline,
            // it would make every request's future, and every connection, that much bigger.
            if Box::pin(self.refresh_jwks(true)).await {
                let set = self.keys.load();
                outcome = jwt::check_signature(&parts, &self.policy, &set.keys);
            }
        }
        match outcome {
            SigCheck::Ok => {}
            SigCheck::UnknownKid(k) => return Err(TokenError::UnknownKid(k).into()),
            SigCheck::Failed(e) => return Err(e.into()),
        }
        let verified = jwt::check_claims(&parts.payload, &self.policy, now)?;
        let identity = Arc::new(self.identity(&verified));
        self.cache
            .insert(token, key_generation, verified.exp, identity.clone());
        Ok(identity)
    }

    fn identity(&self, v: &jwt::Verified) -> Identity {
        let mut headers = Vec::with_capacity(1 + self.forward_claims.len());
        if let Ok(h) = HeaderValue::from_str(&v.consumer) {
            headers.push((X_CONSUMER_ID, h));
        }
        for (claim, header) in &self.forward_claims {
            let text = match v.claims.get(claim) {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(serde_json::Value::Null) | None => continue,
                Some(other) => other.to_string(),
            };
            if let Ok(h) = HeaderValue::from_str(&text) {
                headers.push((header.clone(), h));
            }
        }
        Identity {
            consumer: Arc::from(v.consumer.as_str()),
            headers,
            scopes: scopes_of(&v.claims),
            // An empty claim names no plan (the default applies). A claim that is not a string
            // names no plan the gateway knows: it becomes a name no plan can have (plan names
            // are letters, digits, `-`, `_` and `.`), so it is refused as an unknown plan
            // rather than matching a plan called "1" or "true", or being ignored.
            plan: self
                .plan_claim
                .as_ref()
                .and_then(|c| match v.claims.get(c) {
                    Some(serde_json::Value::String(s)) if s.is_empty() => None,
                    Some(serde_json::Value::String(s)) => Some(Arc::from(s.as_str())),
                    Some(serde_json::Value::Null) | None => None,
                    Some(other) => {
                        let text: String = other.to_string().chars().take(64).collect();
                        Some(Arc::from(format!("<{text}>").as_str()))
                    }
                }),
            key_id: None,
        }
    }

    /// Fetches the JWKS now. `on_demand` refreshes (unknown kid) happen at most once per few
    /// seconds. Returns true when a new key set was installed.
    pub async fn refresh_jwks(&self, on_demand: bool) -> bool {
        let Some(url) = &self.jwks_url else {
            return false;
        };
        let mut last = self.refresh.lock().await;
        if on_demand && last.is_some_and(|t| t.elapsed() < MIN_REFRESH_GAP) {
            return false;
        }
        *last = Some(Instant::now());
        // Logged with its userinfo and query values (api_key=...) redacted.
        let shown = hexgate_http::httpc::redact_url(url);
        match hexgate_http::httpc::get_url(url, Duration::from_secs(5)).await {
            Ok((body, max_age)) => match keys::from_jwks(&body, url) {
                Ok(jwks_keys) => {
                    let old = self.keys.load();
                    let mut all = self.pem_keys.clone();
                    all.extend(jwks_keys);
                    if all != old.keys {
                        let generation = old.generation + 1;
                        self.keys.store(Arc::new(KeySet {
                            keys: all,
                            generation,
                        }));
                        self.cache.clear();
                        tracing::info!(url = %shown, keys = self.key_count(), "JWKS key set updated");
                    }
                    self.metrics.record_jwks_refresh(true);
                    drop(last);
                    self.next_refresh_hint(max_age);
                    true
                }
                Err(e) => {
                    self.metrics.record_jwks_refresh(false);
                    tracing::warn!(url = %shown, error = %e, "JWKS refresh failed; keeping the last good key set");
                    false
                }
            },
            Err(e) => {
                self.metrics.record_jwks_refresh(false);
                // `HttpError::Url` carries the URL it could not use: show it redacted too.
                let error = match e {
                    hexgate_http::httpc::HttpError::Url(u) => {
                        hexgate_http::httpc::HttpError::Url(hexgate_http::httpc::redact_url(&u))
                    }
                    other => other,
                };
                tracing::warn!(url = %shown, %error, "JWKS refresh failed; keeping the last good key set");
                false
            }
        }
    }

    fn next_refresh_hint(&self, max_age: Option<Duration>) {
        let age = max_age
            .unwrap_or(DEFAULT_JWKS_MAX_AGE)
            .clamp(MIN_REFRESH_GAP, Duration::from_secs(24 * 3600));
        self.refresh_after_secs
            .store(age.as_secs(), Ordering::Relaxed);
    }
}

/// Background refresh: at start, then on the JWKS's Cache-Control max-age (default 5 minutes),
/// retrying failures with a capped back-off. Stops when the authenticator is dropped.
async fn refresh_loop(auth: Weak<Authenticator>) {
    let mut failures = 0u32;
    loop {
        let wait = {
            let Some(a) = auth.upgrade() else { return };
            if a.refresh_jwks(false).await {
                failures = 0;
                Duration::from_secs(a.refresh_after_secs.load(Ordering::Relaxed))
            } else {
                failures += 1;
                Duration::from_secs(1 << failures.min(5)).min(Duration::from_secs(30))
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive).
fn bearer(value: &HeaderValue) -> Result<&str, AuthError> {
    let s = value.to_str().map_err(|_| AuthError::BadHeader)?;
    let (scheme, token) = s.split_once(' ').ok_or(AuthError::BadHeader)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::BadHeader);
    }
    let token = token.trim();
    if token.is_empty() || token.contains(' ') {
        return Err(AuthError::BadHeader);
    }
    Ok(token)
}

#[cfg(test)]
mod tests;

/// A token's scopes: `scope` (RFC 8693/9068: space-separated) or `scp` (an array, or a string).
fn scopes_of(claims: &serde_json::Map<String, serde_json::Value>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    if let Some(serde_json::Value::String(s)) = claims.get("scope") {
        out.extend(s.split_whitespace().map(str::to_string));
    }
    match claims.get("scp") {
        Some(serde_json::Value::Array(a)) => {
            out.extend(a.iter().filter_map(|v| v.as_str()).map(str::to_string));
        }
        Some(serde_json::Value::String(s)) => out.extend(s.split_whitespace().map(str::to_string)),
        _ => {}
    }
    out
}
