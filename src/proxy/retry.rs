//! `retryOn`, `retryBudget` and `circuitBreaker` of a route: what is retried on another
//! backend, how many retries the route may spend, and when a failing backend is ejected.
//!
//! The budget (Envoy's retry budget) is per route and per instance: a retry is allowed while
//! the retries of the last second stay under max(`minPerSecond`, `percent` % of the requests
//! of the last second). The second is a sliding window of ten 100 ms buckets of atomics, on the
//! injected clock; a reload starts a new window. A route whose `retryOn` lists `reset` or a
//! status and that sets no `retryBudget` gets [`DEFAULT_BUDGET`] (20 %, at least 5 per second,
//! Envoy's recommendation): retrying requests that were sent may multiply a failing fleet's
//! load, so it is never unbounded. A route that retries `connect-failure` only (the default)
//! keeps no budget: a request never written costs the backends nothing.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use hexgate_http::clock::Clock;

use crate::config::{CircuitBreaker, Policies, RetryBudget, RetryOn};
use crate::metrics::RETRY_REASONS;

/// Why a request is sent again: what its previous attempt met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// The connection could not be made, or the request was never written.
    ConnectFailure,
    /// The stream was reset, or the connection closed before a response head.
    Reset,
    /// The backend answered with this status (500, 502, 503, 504).
    Status(u16),
}

impl Why {
    /// Index into `metrics::RETRY_REASONS`.
    pub fn reason(self) -> usize {
        let label = match self {
            Why::ConnectFailure => "connect_failure",
            Why::Reset => "reset",
            Why::Status(500) => "500",
            Why::Status(502) => "502",
            Why::Status(503) => "503",
            Why::Status(504) => "504",
            Why::Status(_) => return usize::MAX,
        };
        RETRY_REASONS
            .iter()
            .position(|r| *r == label)
            .unwrap_or(usize::MAX)
    }
}

/// A route's retry and ejection policy, with its budget's state.
#[derive(Debug)]
pub struct RetryRt {
    pub on: Vec<RetryOn>,
    pub breaker: Option<CircuitBreaker>,
    /// `connect-failure` listed (the default).
    pub connect: bool,
    /// `reset` listed.
    pub reset: bool,
    /// The statuses listed, as bits: 500, 502, 503, 504.
    statuses: u8,
    /// The effective budget: `retryBudget`, else [`DEFAULT_BUDGET`] when `retryOn` lists
    /// `reset` or a status (None: `connect-failure` only, retries limited by `retries` only).
    pub budget: Option<Budget>,
}

/// The budget of a route that retries after sending (`reset`, a status) and sets no
/// `retryBudget`: Envoy's recommended 20 % of requests, at least 5 retries per second.
pub const DEFAULT_BUDGET: RetryBudget = RetryBudget {
    percent: 20.0,
    min_per_second: 5,
};

/// The statuses `retryOn` may name, in bit order.
const STATUSES: [u16; 4] = [500, 502, 503, 504];

impl RetryRt {
    pub fn build(p: &Policies) -> RetryRt {
        Self::with_clock(p, Clock::System)
    }

    pub fn with_clock(p: &Policies, clock: Clock) -> RetryRt {
        let mut statuses = 0u8;
        for on in &p.retry_on {
            if let RetryOn::Status(s) = on {
                if let Some(i) = STATUSES.iter().position(|x| x == s) {
                    statuses |= 1 << i;
                }
            }
        }
        let reset = p.retry_on.contains(&RetryOn::Reset);
        let budget = match p.retry_budget {
            Some(b) => Some(b),
            None if reset || statuses != 0 => Some(DEFAULT_BUDGET),
            None => None,
        };
        RetryRt {
            on: p.retry_on.clone(),
            breaker: p.circuit_breaker,
            connect: p.retry_on.contains(&RetryOn::ConnectFailure),
            reset,
            statuses,
            budget: budget.map(|b| Budget::new(b, clock)),
        }
    }

    /// Whether `status` from a backend is retried.
    pub fn on_status(&self, status: u16) -> bool {
        self.statuses != 0
            && STATUSES
                .iter()
                .position(|s| *s == status)
                .is_some_and(|i| self.statuses & (1 << i) != 0)
    }

    /// Whether requests may be retried after they were sent (a reset or a status): then a
    /// copy of a safe request's head is kept for each attempt.
    pub fn after_sending(&self) -> bool {
        self.reset || self.statuses != 0
    }

    /// How much of a pool passive ejection may take out on this route, in percent.
    pub fn max_ejected_percent(&self) -> u32 {
        self.breaker
            .map_or(crate::upstream::DEFAULT_MAX_EJECTED_PERCENT, |b| {
                b.max_ejected_percent
            })
    }
}

/// Buckets of the budget's window, and their width.
const BUCKETS: usize = 10;
const BUCKET_US: u64 = 100_000;

/// A bucket's `tick` while its counts are being emptied for a new tick.
const RESETTING: u64 = u64::MAX;

/// One 100 ms bucket: which tick it holds, and its counts.
#[derive(Debug, Default)]
struct Bucket {
    /// The tick (`now / 100 ms`) plus one; 0: never used.
    tick: AtomicU64,
    requests: AtomicU32,
    retries: AtomicU32,
}

/// A route's retry budget: the requests and retries of the last second.
#[derive(Debug)]
pub struct Budget {
    percent: f64,
    min_per_second: u32,
    clock: Clock,
    buckets: [Bucket; BUCKETS],
}

impl Budget {
    pub fn new(b: RetryBudget, clock: Clock) -> Budget {
        Budget {
            percent: b.percent,
            min_per_second: b.min_per_second,
            clock,
            buckets: Default::default(),
        }
    }

    /// The bucket of `tick`, emptied first if it still holds an older tick. The emptying is
    /// fenced: the bucket is marked [`RESETTING`] while its counts go to zero, and requests
    /// that find the mark wait the two stores out, so no count added for the new tick is lost
    /// to it (a lost count would let the budget overshoot). A bucket already holding a later
    /// tick (a request that read the clock a second ago) is used as it is.
    fn bucket(&self, tick: u64) -> &Bucket {
        let b = &self.buckets[(tick % BUCKETS as u64) as usize];
        let stamp = tick + 1;
        let mut spins = 0u32;
        loop {
            let seen = b.tick.load(Ordering::Acquire);
            if seen == RESETTING {
                spins += 1;
                if spins < 64 {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
                continue;
            }
            if seen >= stamp {
                return b;
            }
            if b.tick
                .compare_exchange(seen, RESETTING, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                b.requests.store(0, Ordering::Relaxed);
                b.retries.store(0, Ordering::Relaxed);
                b.tick.store(stamp, Ordering::Release);
                return b;
            }
        }
    }

    /// Counts a request (each request once, however many attempts it takes).
    pub fn request(&self) {
        let tick = self.clock.now_us() / BUCKET_US;
        self.bucket(tick).requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests and retries over the last second (the current bucket and the nine before).
    fn window(&self, tick: u64) -> (u64, u64) {
        let (mut requests, mut retries) = (0u64, 0u64);
        for b in &self.buckets {
            let stamp = b.tick.load(Ordering::Acquire);
            // A bucket being emptied holds nothing yet.
            if stamp != 0
                && stamp != RESETTING
                && stamp - 1 + (BUCKETS as u64) > tick
                && stamp - 1 <= tick
            {
                requests += u64::from(b.requests.load(Ordering::Relaxed));
                retries += u64::from(b.retries.load(Ordering::Relaxed));
            }
        }
        (requests, retries)
    }

    /// The limits in force (`retryBudget`, or [`DEFAULT_BUDGET`]).
    pub fn limits(&self) -> RetryBudget {
        RetryBudget {
            percent: self.percent,
            min_per_second: self.min_per_second,
        }
    }

    /// Takes one retry if the window has room: retries in the last second, this one included,
    /// at most max(`minPerSecond`, `percent` % of its requests).
    ///
    /// The retry is added first, then the window checked, and the retry taken back when it
    /// does not fit: of requests racing for the last places, the one whose addition came last
    /// sees every earlier one and refuses itself, so concurrent requests never take more than
    /// the limit between them (a check-then-add let all of them see the same room; and a
    /// bucket's emptying for a new tick loses no count, see `bucket`). Racing requests may
    /// all refuse themselves when one place is left, which errs on the safe side. The window
    /// itself moves by 100 ms steps, so the bound is per window as it stands at each retry.
    pub fn try_retry(&self) -> bool {
        let tick = self.clock.now_us() / BUCKET_US;
        let bucket = self.bucket(tick);
        bucket.retries.fetch_add(1, Ordering::AcqRel);
        let (requests, retries) = self.window(tick);
        let share = (requests as f64 * self.percent / 100.0).floor() as u64;
        if retries > share.max(u64::from(self.min_per_second)) {
            // Saturating: the bucket may have been emptied for a new tick meanwhile.
            let _ = bucket
                .retries
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| v.checked_sub(1));
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hexgate_http::clock::ManualClock;

    fn budget(percent: f64, min: u32) -> (Budget, ManualClock) {
        let m = ManualClock::new(1_000_000_000);
        (
            Budget::new(
                RetryBudget {
                    percent,
                    min_per_second: min,
                },
                Clock::Manual(m.clone()),
            ),
            m,
        )
    }

    fn take(b: &Budget, n: usize) -> usize {
        (0..n).filter(|_| b.try_retry()).count()
    }

    #[test]
    fn the_minimum_holds_whatever_the_traffic() {
        let (b, clock) = budget(20.0, 5);
        assert_eq!(take(&b, 10), 5, "no requests: minPerSecond only");
        // A second later the window has moved on: five more.
        clock.advance_us(1_000_000);
        assert_eq!(take(&b, 10), 5);
    }

    #[test]
    fn the_share_of_requests_bounds_retries() {
        let (b, _clock) = budget(20.0, 5);
        for _ in 0..100 {
            b.request();
        }
        assert_eq!(take(&b, 100), 20, "20 % of 100 requests");
        for _ in 0..10 {
            b.request();
        }
        assert_eq!(take(&b, 100), 2, "22 of 110");
    }

    #[test]
    fn the_window_slides_by_buckets() {
        let (b, clock) = budget(50.0, 0);
        // 100 requests and 50 retries in the first 100 ms.
        for _ in 0..100 {
            b.request();
        }
        assert_eq!(take(&b, 100), 50);
        // 900 ms later they are still in the window: nothing more without new requests.
        clock.advance_us(900_000);
        assert_eq!(take(&b, 10), 0);
        for _ in 0..10 {
            b.request();
        }
        assert_eq!(take(&b, 10), 5, "55 of 110");
        // 100 ms more and the first bucket has left the window: 10 requests, 5 retries in it.
        clock.advance_us(100_000);
        assert_eq!(take(&b, 10), 0);
        for _ in 0..2 {
            b.request();
        }
        assert_eq!(take(&b, 10), 1, "6 of 12");
        // A bucket reused for a later tick starts from zero.
        clock.advance_us(1_000_000);
        assert_eq!(b.window(clock.now_us() / BUCKET_US), (0, 0));
    }

    #[test]
    fn concurrent_retries_never_take_more_than_the_budget() {
        // Check-then-add let every thread see the same room; add-first lets the last one see
        // all the others. No tick boundary here (the clock stands still): the bound is exact.
        for round in 0..50 {
            let (b, _clock) = budget(20.0, 5);
            let b = &b;
            let barrier = std::sync::Barrier::new(8);
            let taken: usize = std::thread::scope(|s| {
                let handles: Vec<_> = (0..8)
                    .map(|_| {
                        let barrier = &barrier;
                        s.spawn(move || {
                            barrier.wait();
                            take(b, 4)
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).sum()
            });
            assert!(
                taken <= 5,
                "round {round}: {taken} retries under a minimum of 5"
            );
            // Refusals were taken back: exactly the ones allowed stay counted.
            assert_eq!(b.window(b.clock.now_us() / BUCKET_US).1, taken as u64);
        }
    }

    #[test]
    fn retrying_after_sending_gets_the_default_budget() {
        for on in [
            vec![RetryOn::Status(503)],
            vec![RetryOn::ConnectFailure, RetryOn::Reset],
        ] {
            let p = Policies {
                retry_on: on.clone(),
                ..Policies::default()
            };
            let r = RetryRt::build(&p);
            assert_eq!(
                r.budget.as_ref().map(Budget::limits),
                Some(DEFAULT_BUDGET),
                "{on:?}"
            );
        }
        // connect-failure only: unlimited within `retries`, as before.
        let p = Policies {
            retry_on: vec![RetryOn::ConnectFailure],
            ..Policies::default()
        };
        assert!(RetryRt::build(&p).budget.is_none());
        // A budget of the route's own is kept.
        let own = RetryBudget {
            percent: 50.0,
            min_per_second: 1,
        };
        let p = Policies {
            retry_on: vec![RetryOn::Status(503)],
            retry_budget: Some(own),
            ..Policies::default()
        };
        assert_eq!(RetryRt::build(&p).budget.map(|b| b.limits()), Some(own));
        // The default stops at 5 a second without traffic, 20 % with it.
        let (clock, d) = (ManualClock::new(5_000_000), Clock::Manual);
        let r = RetryRt::with_clock(
            &Policies {
                retry_on: vec![RetryOn::Status(503)],
                ..Policies::default()
            },
            d(clock.clone()),
        );
        let b = r.budget.as_ref().unwrap();
        assert_eq!(take(b, 20), 5);
        for _ in 0..100 {
            b.request();
        }
        assert_eq!(take(b, 100), 15, "20 of 100 requests, 5 taken already");
    }

    #[test]
    fn retry_on_words() {
        let p = Policies {
            retry_on: vec![RetryOn::Reset, RetryOn::Status(503), RetryOn::Status(500)],
            ..Policies::default()
        };
        let r = RetryRt::build(&p);
        assert!(!r.connect && r.reset && r.after_sending());
        assert!(r.on_status(503) && r.on_status(500) && !r.on_status(502));
        let d = RetryRt::build(&Policies::default());
        assert!(d.connect && !d.reset && !d.after_sending() && !d.on_status(503));
        assert!(d.budget.is_none());
        assert_eq!(d.max_ejected_percent(), 50);
        assert_eq!(Why::Status(503).reason(), 4);
        assert_eq!(Why::ConnectFailure.reason(), 0);
    }
}
