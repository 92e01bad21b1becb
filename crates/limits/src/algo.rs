//! The limit maths, shared by the in-memory store and (as Lua) the Redis store.
//!
//! Rate limit: GCRA. Emission interval T = 1/rate; a request at `now` is admitted when
//! `max(tat, now) + T - now <= burst * T`, and then `tat = max(tat, now) + T`. So `burst` requests
//! pass at once and one more every T after that.
//!
//! Quota: a sliding window of `period` split into `BUCKETS` sub-buckets of width
//! `w = ceil(period / BUCKETS)`. A request at `now` counts every bucket from `cur - BUCKETS` to
//! `cur` (`cur = floor(now / w)`), which covers at least the last `period`, and is admitted when that
//! sum plus one is at most `limit`. Hence: in any window of length `period`, at most `limit`
//! requests are admitted (exact on that side), and a request may be refused at most `w` earlier
//! than an exact log would (the oldest, partly outside bucket is counted in full; plus the rounding
//! of `BUCKETS * w` above `period`, under `BUCKETS` microseconds). State per key: at most
//! `BUCKETS + 1` counters, whatever the limit.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

/// Sub-buckets per quota window.
pub const BUCKETS: u64 = 60;

/// One decision of one limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Requests still allowed right now after this one.
    pub remaining: u64,
    /// Microseconds until the limit fully resets (rate) or the next slot frees (quota).
    pub reset_us: u64,
    /// Microseconds until a refused request could pass (0 when allowed).
    pub retry_after_us: u64,
    /// Quota only: the bucket this request was counted in (for refunds).
    pub bucket: Option<u64>,
}

/// GCRA parameters in microseconds.
#[derive(Debug, Clone, Copy)]
pub struct Gcra {
    pub interval_us: u64,
    pub burst: u64,
}

impl Gcra {
    pub fn new(rate_per_second: f64, burst: u64) -> Gcra {
        let interval_us = ((1e6 / rate_per_second).round() as u64).max(1);
        Gcra {
            interval_us,
            burst: burst.max(1),
        }
    }

    pub fn tolerance_us(&self) -> u64 {
        self.interval_us.saturating_mul(self.burst)
    }

    /// Decides at `now` given the stored TAT; returns the decision and the TAT to store.
    pub fn decide(&self, tat: Option<u64>, now: u64) -> (Decision, Option<u64>) {
        let base = tat.unwrap_or(now).max(now);
        let new_tat = base + self.interval_us;
        let limit = self.tolerance_us();
        if new_tat - now > limit {
            let retry = new_tat - now - limit;
            (
                Decision {
                    allowed: false,
                    remaining: 0,
                    reset_us: base - now,
                    retry_after_us: retry,
                    bucket: None,
                },
                None,
            )
        } else {
            let used = new_tat - now;
            (
                Decision {
                    allowed: true,
                    remaining: (limit - used) / self.interval_us,
                    reset_us: used,
                    retry_after_us: 0,
                    bucket: None,
                },
                Some(new_tat),
            )
        }
    }
}

/// Sliding-window parameters in microseconds.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub limit: u64,
    pub period_us: u64,
}

impl Window {
    pub fn new(limit: u64, period: Duration) -> Window {
        Window {
            limit,
            period_us: (period.as_micros() as u64).max(BUCKETS),
        }
    }

    pub fn width_us(&self) -> u64 {
        self.period_us.div_ceil(BUCKETS)
    }

    /// What the buckets `(index, count)` hold at `now`: the sum of the buckets in the window
    /// (a credit is a negative count, so the sum may be below zero) and the oldest of them.
    pub fn usage(&self, buckets: &VecDeque<(u64, i64)>, now: u64) -> (i64, Option<u64>) {
        let oldest = (now / self.width_us()).saturating_sub(BUCKETS);
        let mut total = 0i64;
        let mut first: Option<u64> = None;
        for (idx, count) in buckets {
            if *idx >= oldest {
                total += count;
                first = Some(first.map_or(*idx, |f: u64| f.min(*idx)));
            }
        }
        (total, first)
    }

    /// Microseconds from `now` until the bucket `first` leaves the window.
    pub fn leaves_in_us(&self, first: u64, now: u64) -> u64 {
        ((first + BUCKETS + 1) * self.width_us()).saturating_sub(now)
    }

    /// Decides at `now` over the buckets `(index, count)`; the caller adds one to `cur` when
    /// allowed. Buckets older than the window are ignored (the caller may drop them).
    pub fn decide(&self, buckets: &VecDeque<(u64, i64)>, now: u64) -> Decision {
        let w = self.width_us();
        let cur = now / w;
        let (total, first) = self.usage(buckets, now);
        let reset_at = |first: u64| (first + BUCKETS + 1) * w;
        let limit = i64::try_from(self.limit).unwrap_or(i64::MAX);
        if total.saturating_add(1) > limit {
            let reset = first.map(|f| reset_at(f).saturating_sub(now)).unwrap_or(w);
            Decision {
                allowed: false,
                remaining: 0,
                reset_us: reset,
                retry_after_us: reset,
                bucket: None,
            }
        } else {
            let first = first.unwrap_or(cur);
            Decision {
                allowed: true,
                remaining: (limit - total - 1) as u64,
                reset_us: reset_at(first).saturating_sub(now),
                retry_after_us: 0,
                bucket: Some(cur),
            }
        }
    }
}

enum Slot {
    Tat(u64),
    /// `(bucket index, count)`, oldest first; a credit is a negative count.
    Buckets(VecDeque<(u64, i64)>),
}

struct Entry {
    slot: Slot,
    /// Quotas: the tag of the last check (a plan's), for the ledger; 0 when none.
    tag: u64,
    /// Microseconds after which the entry carries no information and may be dropped.
    expires: u64,
}

const SHARDS: usize = 16;

/// Adds `n` to bucket `cur`, the newest (appended when absent).
fn add_to(buckets: &mut VecDeque<(u64, i64)>, cur: u64, n: i64) {
    match buckets.back_mut() {
        Some((i, c)) if *i == cur => *c += n,
        _ => buckets.push_back((cur, n)),
    }
}

/// The in-memory store: the embedded default, and the fallback when Redis fails open.
pub struct MemoryStore {
    shards: Vec<Mutex<HashMap<String, Entry>>>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

fn shard_of(key: &str) -> usize {
    // FNV-1a: cheap and stable; the shard only spreads lock contention.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in key.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    (h as usize) % SHARDS
}

impl MemoryStore {
    fn with_shard<R>(
        &self,
        key: &str,
        now: u64,
        f: impl FnOnce(&mut HashMap<String, Entry>) -> R,
    ) -> R {
        let mut map = match self.shards[shard_of(key)].lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        // Idle keys expire: sweep when the shard has grown.
        if map.len() >= 4096 && map.len().is_power_of_two() {
            map.retain(|_, e| e.expires > now);
        }
        f(&mut map)
    }

    pub fn rate(&self, key: &str, g: &Gcra, now: u64) -> Decision {
        self.with_shard(key, now, |map| {
            let tat = match map.get(key) {
                Some(Entry {
                    slot: Slot::Tat(t), ..
                }) => Some(*t),
                _ => None,
            };
            let (d, new_tat) = g.decide(tat, now);
            if let Some(t) = new_tat {
                map.insert(
                    key.to_string(),
                    Entry {
                        slot: Slot::Tat(t),
                        tag: 0,
                        expires: t,
                    },
                );
            }
            d
        })
    }

    /// Charges one request to the quota `key` (tagged `tag`, 0 for none) when it fits.
    pub fn quota(&self, key: &str, w: &Window, now: u64) -> Decision {
        self.quota_tagged(key, w, 0, now)
    }

    pub fn quota_tagged(&self, key: &str, w: &Window, tag: u64, now: u64) -> Decision {
        self.with_window(key, w, now, |entry, buckets| {
            if tag != 0 {
                entry.tag = tag;
            }
            let d = w.decide(buckets, now);
            if let Some(cur) = d.bucket {
                add_to(buckets, cur, 1);
                entry.expires = now + w.period_us + w.width_us();
            }
            d
        })
    }

    /// The quota `key` at `now` without charging it: the sum of its window, microseconds until
    /// its oldest counted bucket leaves, and its tag.
    pub fn quota_peek(&self, key: &str, w: &Window, now: u64) -> (i64, u64, u64) {
        // A read creates nothing.
        let exists = match self.shards[shard_of(key)].lock() {
            Ok(m) => m.contains_key(key),
            Err(p) => p.into_inner().contains_key(key),
        };
        if !exists {
            return (0, 0, 0);
        }
        self.with_window(key, w, now, |entry, buckets| {
            let (total, first) = w.usage(buckets, now);
            let leaves = first.map_or(0, |f| w.leaves_in_us(f, now));
            (total, leaves, entry.tag)
        })
    }

    /// `amount` more requests in the window of `key` from `now`: a negative count in the
    /// current bucket, which leaves the window with it.
    pub fn quota_credit(&self, key: &str, w: &Window, amount: u64, now: u64) {
        self.with_window(key, w, now, |entry, buckets| {
            let amount = i64::try_from(amount).unwrap_or(i64::MAX);
            add_to(buckets, now / w.width_us(), -amount);
            entry.expires = now + w.period_us + w.width_us();
        })
    }

    /// Forgets the counter `key`; whether there was one.
    pub fn remove(&self, key: &str) -> bool {
        let mut map = match self.shards[shard_of(key)].lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        map.remove(key).is_some()
    }

    /// Runs `f` on the window entry of `key` (created empty), its expired buckets dropped.
    fn with_window<R>(
        &self,
        key: &str,
        w: &Window,
        now: u64,
        f: impl FnOnce(&mut Entry, &mut VecDeque<(u64, i64)>) -> R,
    ) -> R {
        self.with_shard(key, now, |map| {
            let entry = map.entry(key.to_string()).or_insert_with(|| Entry {
                slot: Slot::Buckets(VecDeque::new()),
                tag: 0,
                expires: 0,
            });
            let mut buckets = match std::mem::replace(&mut entry.slot, Slot::Tat(0)) {
                Slot::Buckets(b) => b,
                Slot::Tat(_) => VecDeque::new(),
            };
            let oldest = (now / w.width_us()).saturating_sub(BUCKETS);
            while buckets.front().is_some_and(|(i, _)| *i < oldest) {
                buckets.pop_front();
            }
            let r = f(entry, &mut buckets);
            entry.slot = Slot::Buckets(buckets);
            r
        })
    }

    /// Gives back one admission counted in `bucket` (the request was refused by another limit).
    pub fn refund(&self, key: &str, bucket: u64) {
        let mut map = match self.shards[shard_of(key)].lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        if let Some(Entry {
            slot: Slot::Buckets(b),
            ..
        }) = map.get_mut(key)
        {
            if let Some((_, c)) = b.iter_mut().find(|(i, _)| *i == bucket) {
                *c -= 1;
            }
        }
    }

    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map(|m| m.len()).unwrap_or(0))
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests;
