//! `hexgate_consumer_requests_total{service,consumer,code}` with a bounded number of series.
//!
//! Each service keeps at most [`TOP`] named consumers, each with its counts per status code, and
//! one `other` row for everyone else. Who is named is decided by a Space-Saving sketch
//! ([`SpaceSaving`], Metwally et al. 2005) that counts requests per consumer during the current
//! epoch ([`EPOCH_US`]):
//!
//! - while fewer than [`TOP`] consumers are named, a new consumer is named at its first request,
//!   so a small fleet is counted exactly from the start;
//! - once all [`TOP`] are taken, the named set changes only when an epoch ends: it becomes the
//!   epoch's top [`TOP`] by the sketch's counts (incumbents fill any places the epoch's traffic
//!   leaves open). A consumer leaving the set loses its series; a newcomer starts from zero; while
//!   a consumer is not named its requests are counted in `other`.
//!
//! Counters stay monotonic: a named series only ever grows while it exists (it disappears rather
//! than going down), and `other` only ever grows. Memory is bounded whatever the number of
//! consumers: [`TOP`] slots, [`SKETCH_CAPACITY`] sketch entries, and one count per status code
//! seen in each.
//!
//! A consumer literally called `other` is counted in `other`: it could not be told apart.

use std::sync::Arc;

/// Named consumers per service.
pub const TOP: usize = 20;
/// Entries of the Space-Saving sketch (more than [`TOP`], so the top ones are well estimated).
pub const SKETCH_CAPACITY: usize = 64;
/// Length of an epoch, in microseconds (the unit of `hexgate_http::clock::Clock::now_us`).
pub const EPOCH_US: u64 = 60_000_000;
/// The `consumer` label of the requests of consumers that are not named.
pub const OTHER: &str = "other";

/// Counts per HTTP status code: a handful of codes, so a small vector.
#[derive(Debug, Default, Clone)]
pub struct Codes(Vec<(u16, u64)>);

impl Codes {
    fn add(&mut self, code: u16) {
        match self.0.iter_mut().find(|(c, _)| *c == code) {
            Some((_, n)) => *n += 1,
            None => self.0.push((code, 1)),
        }
    }

    /// (code, count), in the order codes were first seen.
    pub fn iter(&self) -> impl Iterator<Item = (u16, u64)> + '_ {
        self.0.iter().copied()
    }

    pub fn total(&self) -> u64 {
        self.0.iter().map(|(_, n)| n).sum()
    }
}

/// Same consumer: the same allocation (API keys hand out one `Arc` per key), or the same text.
fn same(a: &Arc<str>, b: &str) -> bool {
    std::ptr::eq(a.as_ptr(), b.as_ptr()) && a.len() == b.len() || **a == *b
}

#[derive(Debug, Clone)]
struct Entry {
    key: Arc<str>,
    /// Estimated count: never below the true count, at most `error` above it.
    count: u64,
    error: u64,
}

/// The Space-Saving heavy-hitter sketch: at most `capacity` monitored keys; an unmonitored key
/// replaces the one with the smallest count and inherits that count as its possible error. Any
/// key seen more than `n / capacity` times out of `n` is monitored.
#[derive(Debug)]
pub struct SpaceSaving {
    entries: Vec<Entry>,
    capacity: usize,
}

impl SpaceSaving {
    pub fn new(capacity: usize) -> SpaceSaving {
        SpaceSaving {
            entries: Vec::with_capacity(capacity),
            capacity: capacity.max(1),
        }
    }

    /// Counts one occurrence of `key`. Allocates nothing (the key is an `Arc`).
    pub fn offer(&mut self, key: &Arc<str>) {
        if let Some(e) = self.entries.iter_mut().find(|e| same(&e.key, key)) {
            e.count += 1;
            return;
        }
        if self.entries.len() < self.capacity {
            self.entries.push(Entry {
                key: key.clone(),
                count: 1,
                error: 0,
            });
            return;
        }
        let mut min = 0;
        for (i, e) in self.entries.iter().enumerate() {
            if e.count < self.entries[min].count {
                min = i;
            }
        }
        let e = &mut self.entries[min];
        e.key = key.clone();
        e.error = e.count;
        e.count += 1;
    }

    /// The monitored keys with their guaranteed counts (estimate less possible error: what they
    /// certainly sent), highest first. Ranking by the guaranteed count keeps a flood of one-off
    /// keys, each inheriting the smallest count as its error, from displacing real heavy hitters.
    pub fn top(&self) -> Vec<(Arc<str>, u64)> {
        let mut v: Vec<(Arc<str>, u64)> = self
            .entries
            .iter()
            .map(|e| (e.key.clone(), e.count - e.error))
            .collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.1));
        v
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn clear(&mut self) {
        self.entries.clear();
    }
}

#[derive(Debug)]
struct Slot {
    consumer: Arc<str>,
    codes: Codes,
}

/// One service's consumer counts (kept behind a `Mutex` in `ServiceMetrics`).
#[derive(Debug)]
pub struct ConsumerTable {
    named: Vec<Slot>,
    other: Codes,
    sketch: SpaceSaving,
    /// Start of the current epoch (µs); `None` before the first request.
    epoch_start: Option<u64>,
}

impl Default for ConsumerTable {
    fn default() -> Self {
        ConsumerTable::new()
    }
}

impl ConsumerTable {
    pub fn new() -> ConsumerTable {
        ConsumerTable {
            named: Vec::with_capacity(TOP),
            other: Codes::default(),
            sketch: SpaceSaving::new(SKETCH_CAPACITY),
            epoch_start: None,
        }
    }

    /// Counts one request of `consumer` answered with `code` at `now_us` (µs since the Unix
    /// epoch). For an already named consumer this allocates nothing.
    pub fn record(&mut self, consumer: &Arc<str>, code: u16, now_us: u64) {
        self.roll(now_us);
        if &**consumer == OTHER {
            self.other.add(code);
            return;
        }
        self.sketch.offer(consumer);
        if let Some(slot) = self.named.iter_mut().find(|s| same(&s.consumer, consumer)) {
            slot.codes.add(code);
        } else if self.named.len() < TOP {
            let mut codes = Codes::default();
            codes.add(code);
            self.named.push(Slot {
                consumer: consumer.clone(),
                codes,
            });
        } else {
            self.other.add(code);
        }
    }

    /// Ends the epoch if `now_us` is past it: when the named set is full it becomes the epoch's
    /// top [`TOP`], then the sketch starts over.
    fn roll(&mut self, now_us: u64) {
        let start = match self.epoch_start {
            Some(s) => s,
            None => {
                self.epoch_start = Some(now_us);
                return;
            }
        };
        // A clock that went back starts a new epoch rather than stretching this one.
        if now_us >= start && now_us - start < EPOCH_US {
            return;
        }
        if self.named.len() >= TOP {
            self.rename();
        }
        self.sketch.clear();
        self.epoch_start = Some(now_us);
    }

    /// The named set becomes the sketch's top [`TOP`]; incumbents keep their counts, newcomers
    /// start from zero, and incumbents not displaced keep their places.
    fn rename(&mut self) {
        let mut top = self.sketch.top();
        let mut old = std::mem::take(&mut self.named);
        // Equal counts: incumbents first, so a tie does not churn series.
        top.sort_by_key(|(c, n)| {
            let incumbent = old.iter().any(|s| same(&s.consumer, c));
            (std::cmp::Reverse(*n), !incumbent)
        });
        let mut named = Vec::with_capacity(TOP);
        // A newcomer must have certainly sent something this epoch; incumbents rank first on
        // ties.
        top.retain(|(c, n)| *n > 0 || old.iter().any(|s| same(&s.consumer, c)));
        for (consumer, _) in top.into_iter().take(TOP) {
            match old.iter().position(|s| same(&s.consumer, &consumer)) {
                Some(i) => named.push(old.swap_remove(i)),
                None => named.push(Slot {
                    consumer,
                    codes: Codes::default(),
                }),
            }
        }
        // Fewer than TOP consumers this epoch: every one of them is named; the places left keep
        // their incumbents (idle this epoch), so their series carry on.
        for slot in old {
            if named.len() >= TOP {
                break;
            }
            named.push(slot);
        }
        self.named = named;
    }

    /// The named consumers' counts, then `None` for `other` (only once it counted something).
    pub fn series(&self) -> Vec<(Option<Arc<str>>, Codes)> {
        let mut out: Vec<(Option<Arc<str>>, Codes)> = self
            .named
            .iter()
            .filter(|s| s.codes.total() > 0)
            .map(|s| (Some(s.consumer.clone()), s.codes.clone()))
            .collect();
        if self.other.total() > 0 {
            out.push((None, self.other.clone()));
        }
        out
    }

    pub fn named_len(&self) -> usize {
        self.named.len()
    }

    pub fn sketch_len(&self) -> usize {
        self.sketch.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::collections::{BTreeMap, HashMap};

    const T0: u64 = 1_700_000_000_000_000;

    fn ids(prefix: &str, n: usize) -> Vec<Arc<str>> {
        (0..n).map(|i| Arc::from(format!("{prefix}{i}"))).collect()
    }

    /// Every series as (consumer or "<other>", code) -> count.
    fn flat(t: &ConsumerTable) -> BTreeMap<(String, u16), u64> {
        let mut m = BTreeMap::new();
        for (c, codes) in t.series() {
            let name = c.map_or("<other>".to_string(), |c| c.to_string());
            for (code, n) in codes.iter() {
                assert!(
                    m.insert((name.clone(), code), n).is_none(),
                    "duplicate series"
                );
            }
        }
        m
    }

    /// xorshift64*: a seeded, dependency-free PRNG.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn space_saving_keeps_the_heavy_hitters() {
        let mut s = SpaceSaving::new(8);
        let heavy: Vec<Arc<str>> = ids("heavy", 3);
        let light = ids("light", 500);
        for (i, l) in light.iter().enumerate() {
            s.offer(l);
            s.offer(&heavy[i % 3]);
            s.offer(&heavy[0]);
        }
        assert_eq!(s.len(), 8);
        let top: Vec<String> = s.top().iter().take(3).map(|(k, _)| k.to_string()).collect();
        assert_eq!(top[0], "heavy0");
        assert!(top.contains(&"heavy1".to_string()) && top.contains(&"heavy2".to_string()));
        // Estimates never fall below the true counts.
        let est: HashMap<String, u64> = s
            .top()
            .into_iter()
            .map(|(k, n)| (k.to_string(), n))
            .collect();
        assert!(est["heavy0"] >= 500 + 167);
    }

    #[test]
    fn exact_with_twenty_consumers_or_fewer() {
        let mut t = ConsumerTable::new();
        let cs = ids("c", TOP);
        let mut want = BTreeMap::new();
        let mut now = T0;
        for round in 0..50u64 {
            for (i, c) in cs.iter().enumerate() {
                // Consumer i sends in i+1 of every 20 rounds, so counts differ.
                if (round % 20) as usize <= i {
                    let code = if (round + i as u64) % 3 == 0 {
                        429
                    } else {
                        200
                    };
                    t.record(c, code, now);
                    *want.entry((c.to_string(), code)).or_insert(0) += 1;
                }
            }
            // Epochs pass: nothing changes for a fleet that fits.
            now += EPOCH_US / 7;
        }
        assert_eq!(flat(&t), want);
        assert_eq!(t.named_len(), TOP);
    }

    #[test]
    fn bounded_with_a_thousand_consumers() {
        let mut t = ConsumerTable::new();
        let cs = ids("consumer-", 1000);
        let mut rng = Rng(7);
        let mut now = T0;
        let mut sent = 0u64;
        for _ in 0..50_000 {
            let c = &cs[rng.below(1000) as usize];
            t.record(c, if rng.below(10) == 0 { 404 } else { 200 }, now);
            sent += 1;
            now += 10_000; // 100 requests/s: several epochs
            assert!(t.named_len() <= TOP);
            assert!(t.sketch_len() <= SKETCH_CAPACITY);
        }
        let series = t.series();
        assert!(series.len() <= TOP + 1, "{} series", series.len());
        assert!(series.iter().all(|(_, codes)| codes.0.len() <= 2));
        assert!(series.iter().any(|(c, _)| c.is_none()), "other counted");
        let counted: u64 = series.iter().map(|(_, c)| c.total()).sum();
        assert!(counted <= sent);
    }

    #[test]
    fn a_heavy_latecomer_is_named_after_an_epoch() {
        let mut t = ConsumerTable::new();
        let early = ids("early", TOP);
        for c in &early {
            t.record(c, 200, T0);
        }
        let heavy: Arc<str> = Arc::from("heavy");
        for _ in 0..100 {
            t.record(&heavy, 200, T0 + 1_000_000);
        }
        // The table was full: the latecomer is counted in other, not named.
        let f = flat(&t);
        assert_eq!(f[&("<other>".to_string(), 200)], 100);
        assert!(!f.contains_key(&("heavy".to_string(), 200)));
        // Some early consumers keep sending a little.
        for c in early.iter().take(5) {
            t.record(c, 200, T0 + 2_000_000);
        }

        // The epoch ends: heavy is named from zero, other keeps what it had.
        t.record(&heavy, 503, T0 + EPOCH_US + 1);
        let f = flat(&t);
        assert_eq!(f[&("heavy".to_string(), 503)], 1);
        assert!(!f.contains_key(&("heavy".to_string(), 200)));
        assert_eq!(f[&("<other>".to_string(), 200)], 100);
        assert_eq!(t.named_len(), TOP);
        // The five that sent again kept their series and counts.
        for c in early.iter().take(5) {
            assert_eq!(f[&(c.to_string(), 200)], 2, "{c}");
        }
        // Exactly one early consumer gave its place up (its series is gone).
        let gone = early
            .iter()
            .filter(|c| !f.contains_key(&(c.to_string(), 200)))
            .count();
        assert_eq!(gone, 1);
    }

    #[test]
    fn a_consumer_called_other_is_counted_in_other() {
        let mut t = ConsumerTable::new();
        let other: Arc<str> = Arc::from("other");
        t.record(&other, 200, T0);
        t.record(&Arc::from("alice"), 200, T0);
        let f = flat(&t);
        assert_eq!(f.len(), 2);
        assert_eq!(f[&("<other>".to_string(), 200)], 1);
        assert_eq!(t.named_len(), 1);
    }

    #[test]
    fn no_allocation_needed_for_a_named_consumer() {
        // The same Arc is matched by address; a fresh Arc with the same text by content.
        let mut t = ConsumerTable::new();
        let a: Arc<str> = Arc::from("alice");
        t.record(&a, 200, T0);
        t.record(&Arc::from("alice"), 200, T0);
        assert_eq!(flat(&t)[&("alice".to_string(), 200)], 2);
        assert_eq!(
            Arc::strong_count(&a),
            3,
            "one clone in the slot, one in the sketch"
        );
    }

    /// Random traffic (a shifting set of heavy consumers over a long tail), random codes and
    /// time steps: after every request, every series that existed before and still exists has
    /// not gone down, `other` has not gone down, and what the series show plus what left with
    /// removed series is every request counted.
    #[test]
    fn every_series_is_monotonic_across_epochs() {
        for seed in [1u64, 42, 2024, 0xdead_beef] {
            let mut rng = Rng(seed);
            let mut t = ConsumerTable::new();
            let cs = ids("u", 300);
            let codes = [200u16, 201, 404, 429, 500, 503];
            let mut now = T0;
            let mut prev = flat(&t);
            let mut retired = 0u64;
            let mut sent = 0u64;
            let mut renames = 0;
            let mut last_named: Vec<String> = Vec::new();
            for step in 0..12_000u64 {
                // Every ~5 epochs a different group of 25 is heavy.
                let phase = now.saturating_sub(T0) / (EPOCH_US * 5);
                let c = if rng.below(3) > 0 {
                    &cs[((phase * 25 + rng.below(25)) % 300) as usize]
                } else {
                    &cs[rng.below(300) as usize]
                };
                let code = codes[rng.below(codes.len() as u64) as usize];
                t.record(c, code, now);
                sent += 1;
                now += rng.below(40_000) + 1;
                if step % 997 == 0 {
                    // An occasional long pause, and a clock step back.
                    now += EPOCH_US * rng.below(3);
                    now = now.saturating_sub(rng.below(2) * 1_000_000);
                }
                let cur = flat(&t);
                for (k, v) in &prev {
                    match cur.get(k) {
                        Some(n) => assert!(n >= v, "seed {seed}: {k:?} went {v} -> {n}"),
                        None => {
                            assert_ne!(k.0, "<other>", "seed {seed}: other disappeared");
                            retired += v;
                        }
                    }
                }
                // A series that disappeared took all of its consumer's codes with it.
                let shown: u64 = cur.values().sum();
                assert_eq!(shown + retired, sent, "seed {seed} step {step}");
                assert!(t.named_len() <= TOP && t.sketch_len() <= SKETCH_CAPACITY);
                assert!(
                    cur.keys()
                        .map(|k| &k.0)
                        .collect::<std::collections::BTreeSet<_>>()
                        .len()
                        <= TOP + 1
                );
                let named: Vec<String> = t.named.iter().map(|s| s.consumer.to_string()).collect();
                if named != last_named {
                    renames += 1;
                    last_named = named;
                }
                prev = cur;
            }
            assert!(retired > 0, "seed {seed}: the named set never changed");
            assert!(renames > TOP, "seed {seed}: {renames} changes");
        }
    }
}
