//! The verified-token cache: a token seen again skips signature verification. Keyed by a 128-bit
//! keyed hash of the token (never the token itself), bounded in size, an entry never outlives the
//! token's `exp`, and entries from an older key set are ignored (a key-set change clears it).

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use std::collections::hash_map::RandomState;

use super::jwt::TokenError;
use super::Identity;

const SHARDS: usize = 16;
/// Entries per shard; a full shard is emptied (tokens are re-verified once, then cached again).
const SHARD_CAPACITY: usize = 4096;

struct Entry {
    exp: Option<u64>,
    key_generation: u64,
    identity: Arc<Identity>,
}

pub struct TokenCache {
    shards: Vec<RwLock<HashMap<u128, Entry>>>,
    h1: RandomState,
    h2: RandomState,
}

impl Default for TokenCache {
    fn default() -> Self {
        Self::new()
    }
}

impl TokenCache {
    pub fn new() -> Self {
        TokenCache {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            h1: RandomState::new(),
            h2: RandomState::new(),
        }
    }

    fn key(&self, token: &str) -> u128 {
        let mut a = self.h1.build_hasher();
        a.write(token.as_bytes());
        let mut b = self.h2.build_hasher();
        b.write(token.as_bytes());
        (u128::from(a.finish()) << 64) | u128::from(b.finish())
    }

    /// A cached identity, `Err(Expired)` if the cached token has expired since, or None.
    pub fn get(
        &self,
        token: &str,
        key_generation: u64,
        now: u64,
        leeway: Duration,
    ) -> Result<Option<Arc<Identity>>, TokenError> {
        let k = self.key(token);
        let shard = &self.shards[(k as usize) % SHARDS];
        let Ok(map) = shard.read() else {
            return Ok(None);
        };
        match map.get(&k) {
            Some(e) if e.key_generation == key_generation => match e.exp {
                Some(exp) if now >= exp.saturating_add(leeway.as_secs()) => {
                    drop(map);
                    if let Ok(mut m) = shard.write() {
                        m.remove(&k);
                    }
                    Err(TokenError::Expired)
                }
                _ => Ok(Some(e.identity.clone())),
            },
            _ => Ok(None),
        }
    }

    pub fn insert(
        &self,
        token: &str,
        key_generation: u64,
        exp: Option<u64>,
        identity: Arc<Identity>,
    ) {
        let k = self.key(token);
        if let Ok(mut map) = self.shards[(k as usize) % SHARDS].write() {
            if map.len() >= SHARD_CAPACITY {
                map.clear();
            }
            map.insert(
                k,
                Entry {
                    exp,
                    key_generation,
                    identity,
                },
            );
        }
    }

    pub fn clear(&self) {
        for s in &self.shards {
            if let Ok(mut m) = s.write() {
                m.clear();
            }
        }
    }

    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().map(|m| m.len()).unwrap_or(0))
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
