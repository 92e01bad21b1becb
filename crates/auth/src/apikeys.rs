//! API keys: looked up by the SHA-256 of the key a client sends (one digest and one map lookup
//! per request; the file holds only digests, so a leaked key file reveals no key). The set is
//! swapped whole when the key file changes; requests read it without a lock.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::header::{HeaderName, HeaderValue};

use crate::{Identity, X_CONSUMER_ID};
use hexgate_config::apikeys::ApiKeyEntry;

/// Longest key accepted (keys made by `hexgate apikey new` are 47 bytes).
pub const MAX_KEY_LEN: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiKeyError {
    #[error("malformed API key")]
    Malformed,
    #[error("unknown API key")]
    Unknown,
    #[error("API key expired")]
    Expired,
}

impl ApiKeyError {
    /// The `reason` label of `hexgate_auth_failures_total`.
    pub fn label(&self) -> &'static str {
        match self {
            ApiKeyError::Malformed => "apikey_malformed",
            ApiKeyError::Unknown => "apikey_unknown",
            ApiKeyError::Expired => "apikey_expired",
        }
    }
}

/// One key as requests see it.
struct Known {
    identity: Arc<Identity>,
    expires: Option<u64>,
}

/// The current key set.
#[derive(Default)]
pub struct ApiKeyStore {
    keys: ArcSwap<HashMap<[u8; 32], Known>>,
}

impl ApiKeyStore {
    pub fn new(entries: &[ApiKeyEntry]) -> ApiKeyStore {
        let store = ApiKeyStore::default();
        store.replace(entries);
        store
    }

    /// Installs a new key set (a key no longer listed stops working at once).
    pub fn replace(&self, entries: &[ApiKeyEntry]) {
        let map = entries
            .iter()
            .map(|e| {
                let mut headers = Vec::with_capacity(1);
                if let Ok(h) = HeaderValue::from_str(&e.consumer) {
                    headers.push((X_CONSUMER_ID, h));
                }
                let identity = Identity {
                    consumer: Arc::from(e.consumer.as_str()),
                    headers,
                    scopes: e.scopes.clone(),
                    plan: e.plan.as_deref().map(Arc::from),
                    key_id: Some(Arc::from(e.id.as_str())),
                };
                (
                    e.hash,
                    Known {
                        identity: Arc::new(identity),
                        expires: e.expires,
                    },
                )
            })
            .collect();
        self.keys.store(Arc::new(map));
    }

    pub fn len(&self) -> usize {
        self.keys.load().len()
    }

    /// The plans the keys of `consumer` name (for the quota ledger), sorted, without repeats.
    pub fn plans_of(&self, consumer: &str) -> Vec<Arc<str>> {
        let mut plans: Vec<Arc<str>> = self
            .keys
            .load()
            .values()
            .filter(|k| &*k.identity.consumer == consumer)
            .filter_map(|k| k.identity.plan.clone())
            .collect();
        plans.sort();
        plans.dedup();
        plans
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The identity of the key in `value`, checked against `now` (Unix seconds).
    pub fn check(&self, value: &HeaderValue, now: u64) -> Result<Arc<Identity>, ApiKeyError> {
        let key = value.as_bytes();
        if key.is_empty() || key.len() > MAX_KEY_LEN || !key.iter().all(u8::is_ascii_graphic) {
            return Err(ApiKeyError::Malformed);
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, key);
        let mut hash = [0u8; 32];
        hash.copy_from_slice(digest.as_ref());
        let keys = self.keys.load();
        let known = keys.get(&hash).ok_or(ApiKeyError::Unknown)?;
        if known.expires.is_some_and(|t| now >= t) {
            return Err(ApiKeyError::Expired);
        }
        Ok(known.identity.clone())
    }
}

/// A new random key (`hgk_` and 43 base64url characters: 256 bits) and its `sha256:` digest as
/// the key file stores it.
pub fn new_key() -> (String, String) {
    use base64::Engine as _;
    let mut bytes = [0u8; 32];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
    let key = format!(
        "hgk_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    (key.clone(), hash_of(&key))
}

/// `sha256:` and the hex SHA-256 of `key`.
pub fn hash_of(key: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
    let mut out = String::from("sha256:");
    for b in digest.as_ref() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// The header name API keys come in (`apiKeys.header`, lower case).
pub fn header_name(name: &str) -> Option<HeaderName> {
    HeaderName::from_bytes(name.as_bytes()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, expires: Option<u64>) -> ApiKeyEntry {
        let h = hash_of(key);
        let mut hash = [0u8; 32];
        for (i, pair) in h.as_bytes()["sha256:".len()..].chunks(2).enumerate() {
            hash[i] = u8::from_str_radix(std::str::from_utf8(pair).expect("hex"), 16).expect("hex");
        }
        ApiKeyEntry {
            id: "k1".into(),
            consumer: "acme".into(),
            plan: Some("pro".into()),
            hash,
            expires,
            scopes: vec!["orders:read".into()],
            line: 1,
        }
    }

    #[test]
    fn keys_are_found_by_digest_and_checked() {
        assert_eq!(
            hash_of("test"),
            "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
        let store = ApiKeyStore::new(&[entry("good", None), {
            let mut e = entry("old", Some(100));
            e.id = "k2".into();
            e
        }]);
        let v = |s: &str| HeaderValue::from_str(s).expect("value");
        let id = store.check(&v("good"), 1_000).expect("valid");
        assert_eq!(&*id.consumer, "acme");
        assert_eq!(id.plan.as_deref(), Some("pro"));
        assert_eq!(id.scopes, ["orders:read"]);
        assert_eq!(
            store.check(&v("bad"), 1_000).err(),
            Some(ApiKeyError::Unknown)
        );
        assert_eq!(store.check(&v("old"), 99).map(|_| ()), Ok(()));
        assert_eq!(
            store.check(&v("old"), 100).err(),
            Some(ApiKeyError::Expired)
        );
        assert_eq!(store.check(&v(""), 0).err(), Some(ApiKeyError::Malformed));
        assert_eq!(
            store.check(&v("a b"), 0).err(),
            Some(ApiKeyError::Malformed)
        );
        let long = "k".repeat(MAX_KEY_LEN + 1);
        assert_eq!(
            store.check(&v(&long), 0).err(),
            Some(ApiKeyError::Malformed)
        );
        store.replace(&[]);
        assert_eq!(
            store.check(&v("good"), 1_000).err(),
            Some(ApiKeyError::Unknown)
        );
    }

    #[test]
    fn new_keys_are_random_and_hash_to_their_digest() {
        let (a, ha) = new_key();
        let (b, _) = new_key();
        assert_ne!(a, b);
        assert!(a.starts_with("hgk_") && a.len() == 47, "{a}");
        assert_eq!(ha, hash_of(&a));
    }
}
