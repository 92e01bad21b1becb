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
        // A stored TAT beyond this limit's tolerance was left by a slower limit sharing the key
        // (a consumer moved to a faster plan): it counts as this limit's burst used up but for
        // one request, so the new rate applies at once (and is stored from this request on)
        // rather than the old one's backlog.
        // (This limit's own TAT never passes `now + tolerance`: only a slower one's can.)
        let base = match tat.unwrap_or(now).max(now) {
            t if t > now + self.tolerance_us() => now + self.tolerance_us() - self.interval_us,
            t => t,
        };
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

    /// What the window holds at `now`: the requests counted in its buckets, the credits given
    /// in it (the ledger's), and the oldest bucket counting requests.
    pub fn usage(&self, b: &Buckets, now: u64) -> Usage {
        let oldest = (now / self.width_us()).saturating_sub(BUCKETS);
        let mut u = Usage::default();
        for (idx, count) in &b.counts {
            if *idx >= oldest {
                u.used += count;
                u.first = Some(u.first.map_or(*idx, |f: u64| f.min(*idx)));
            }
        }
        for (idx, credit) in &b.credits {
            if *idx >= oldest {
                u.credit += credit;
            }
        }
        u
    }

    /// Microseconds from `now` until the bucket `first` leaves the window.
    pub fn leaves_in_us(&self, first: u64, now: u64) -> u64 {
        ((first + BUCKETS + 1) * self.width_us()).saturating_sub(now)
    }

    /// Decides at `now` over the window's buckets; the caller adds one to `cur` when allowed.
    /// Buckets older than the window are ignored (the caller may drop them).
    pub fn decide(&self, b: &Buckets, now: u64) -> Decision {
        let w = self.width_us();
        let cur = now / w;
        let Usage {
            used,
            credit,
            first,
        } = self.usage(b, now);
        let total = used - i64::try_from(credit).unwrap_or(i64::MAX);
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

/// A quota window's state: `(bucket index, requests counted)` and `(bucket index, credit)`,
/// oldest first.
#[derive(Debug, Default, Clone)]
pub struct Buckets {
    pub counts: VecDeque<(u64, i64)>,
    pub credits: VecDeque<(u64, u64)>,
}

/// What a quota window holds (see [`Window::usage`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub used: i64,
    pub credit: u64,
    pub first: Option<u64>,
}

enum Slot {
    Tat(u64),
    Buckets(Buckets),
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
        self.with_window(key, w, now, true, |entry, b| {
            if tag != 0 {
                entry.tag = tag;
            }
            let d = w.decide(b, now);
            if let Some(cur) = d.bucket {
                add_to(&mut b.counts, cur, 1);
                entry.expires = now + w.period_us + w.width_us();
            }
            d
        })
        .unwrap_or_else(|| w.decide(&Buckets::default(), now))
    }

    /// The quota `key` at `now` without charging it (nor creating it): what its window holds,
    /// microseconds until its oldest counted bucket leaves, and its tag.
    pub fn quota_peek(&self, key: &str, w: &Window, now: u64) -> (Usage, u64, u64) {
        self.with_window(key, w, now, false, |entry, b| {
            let u = w.usage(b, now);
            let leaves = u.first.map_or(0, |f| w.leaves_in_us(f, now));
            (u, leaves, entry.tag)
        })
        .unwrap_or_default()
    }

    /// `amount` more requests in the window of `key` from `now`, unless the credits in the
    /// window would exceed `cap`: a credit in the current bucket, which leaves the window with
    /// it. Whether it was given, and the window after (usage, leaves, tag).
    pub fn quota_credit(
        &self,
        key: &str,
        w: &Window,
        amount: u64,
        cap: u64,
        now: u64,
    ) -> (bool, Usage, u64, u64) {
        self.with_window(key, w, now, true, |entry, b| {
            let before = w.usage(b, now);
            let given = before.credit.saturating_add(amount) <= cap;
            if given {
                let cur = now / w.width_us();
                match b.credits.back_mut() {
                    Some((i, c)) if *i == cur => *c += amount,
                    _ => b.credits.push_back((cur, amount)),
                }
                entry.expires = now + w.period_us + w.width_us();
            }
            let u = w.usage(b, now);
            let leaves = u.first.map_or(0, |f| w.leaves_in_us(f, now));
            (given, u, leaves, entry.tag)
        })
        .unwrap_or_default()
    }

    /// Forgets the counter `key`; whether there was one.
    pub fn remove(&self, key: &str) -> bool {
        let mut map = match self.shards[shard_of(key)].lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        map.remove(key).is_some()
    }

    /// Runs `f` on the window entry of `key` (created empty when `create`, else None when
    /// absent), its expired buckets dropped.
    fn with_window<R>(
        &self,
        key: &str,
        w: &Window,
        now: u64,
        create: bool,
        f: impl FnOnce(&mut Entry, &mut Buckets) -> R,
    ) -> Option<R> {
        self.with_shard(key, now, |map| {
            let entry = if create {
                map.entry(key.to_string()).or_insert_with(|| Entry {
                    slot: Slot::Buckets(Buckets::default()),
                    tag: 0,
                    expires: 0,
                })
            } else {
                map.get_mut(key)?
            };
            let mut b = match std::mem::replace(&mut entry.slot, Slot::Tat(0)) {
                Slot::Buckets(b) => b,
                Slot::Tat(_) => Buckets::default(),
            };
            let oldest = (now / w.width_us()).saturating_sub(BUCKETS);
            while b.counts.front().is_some_and(|(i, _)| *i < oldest) {
                b.counts.pop_front();
            }
            while b.credits.front().is_some_and(|(i, _)| *i < oldest) {
                b.credits.pop_front();
            }
            let r = f(entry, &mut b);
            entry.slot = Slot::Buckets(b);
            Some(r)
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
            if let Some((_, c)) = b.counts.iter_mut().find(|(i, _)| *i == bucket) {
                if *c > 0 {
                    *c -= 1;
                }
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
