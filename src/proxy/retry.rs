//! `retryOn`, `retryBudget` and `circuitBreaker` of a route: what is retried on another
//! backend, how many retries the route may spend, and when a failing backend is ejected.
//!
//! The budget (Envoy's retry budget) is per route and per instance: a retry is allowed while
//! the retries of the last second stay under max(`minPerSecond`, `percent` % of the requests
//! of the last second). The second is a sliding window of ten 100 ms buckets of atomics, on the
//! injected clock; a reload starts a new window.

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
    /// `retryBudget` (None: retries limited by `retries` only).
    pub budget: Option<Budget>,
}

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
        RetryRt {
            on: p.retry_on.clone(),
            breaker: p.circuit_breaker,
            connect: p.retry_on.contains(&RetryOn::ConnectFailure),
            reset: p.retry_on.contains(&RetryOn::Reset),
            statuses,
            budget: p.retry_budget.map(|b| Budget::new(b, clock)),
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

    /// The bucket of `tick`, emptied first if it still holds an older tick. Two requests that
    /// find it stale at once may lose a count between them; the budget is a bound of the order
    /// of a request, not an exact one.
    fn bucket(&self, tick: u64) -> &Bucket {
        let b = &self.buckets[(tick % BUCKETS as u64) as usize];
        let stamp = tick + 1;
        let seen = b.tick.load(Ordering::Acquire);
        if seen != stamp
            && b.tick
                .compare_exchange(seen, stamp, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            b.requests.store(0, Ordering::Relaxed);
            b.retries.store(0, Ordering::Relaxed);
        }
        b
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
            if stamp != 0 && stamp - 1 + (BUCKETS as u64) > tick && stamp - 1 <= tick {
                requests += u64::from(b.requests.load(Ordering::Relaxed));
                retries += u64::from(b.retries.load(Ordering::Relaxed));
            }
        }
        (requests, retries)
    }

    /// Takes one retry if the window has room: retries in the last second below
    /// max(`minPerSecond`, `percent` % of its requests).
    pub fn try_retry(&self) -> bool {
        let tick = self.clock.now_us() / BUCKET_US;
        let (requests, retries) = self.window(tick);
        let share = (requests as f64 * self.percent / 100.0).floor() as u64;
        if retries >= share.max(u64::from(self.min_per_second)) {
            return false;
        }
        self.bucket(tick).retries.fetch_add(1, Ordering::Relaxed);
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
