//! The injected clock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Time in microseconds since the Unix epoch, injected where time decides (limits, the token
/// cache), so tests move it by hand instead of sleeping (governor's style).
///
/// Production uses [`Clock::System`]: the limits' memory store and the token cache read the
/// system clock, and the Redis scripts read Redis's own (`TIME`), so every instance agrees on
/// time. [`Clock::Manual`] is time set by hand (tests): the memory store and the token cache use
/// it, and it is passed to the Redis scripts as their `now`, so both stores decide at the same
/// instants.
#[derive(Debug, Clone, Default)]
pub enum Clock {
    #[default]
    System,
    Manual(ManualClock),
}

impl Clock {
    pub fn now_us(&self) -> u64 {
        match self {
            Clock::System => system_now_us(),
            Clock::Manual(m) => m.now_us(),
        }
    }

    /// Whole seconds since the Unix epoch.
    pub fn now_secs(&self) -> u64 {
        self.now_us() / 1_000_000
    }

    /// The `now` to pass to the Redis scripts: only for a manual clock (else they use `TIME`).
    pub fn manual_us(&self) -> Option<u64> {
        match self {
            Clock::System => None,
            Clock::Manual(m) => Some(m.now_us()),
        }
    }
}

/// A clock that moves only when told to; clones share the same time.
#[derive(Debug, Clone, Default)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    pub fn new(start_us: u64) -> ManualClock {
        ManualClock(Arc::new(AtomicU64::new(start_us)))
    }

    pub fn now_us(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    pub fn set_us(&self, us: u64) {
        self.0.store(us, Ordering::Release);
    }

    pub fn advance_us(&self, by: u64) {
        self.0.fetch_add(by, Ordering::AcqRel);
    }
}

fn system_now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}
