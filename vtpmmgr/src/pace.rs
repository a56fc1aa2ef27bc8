//! Time-based allowances: what each vTPM may ask for how often (GET_QUOTE, SAVEHASHKEY), and
//! when the hardware anti-rollback counter is incremented: at most once per window, so
//! hardware NV writes no longer follow guest NV writes one for one.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{uuid_str, Error, Result};

/// The manager's clock (tests substitute one that they move by hand).
pub type Clock = Arc<dyn Fn() -> Instant + Send + Sync>;

/// The system's monotonic clock.
pub fn system_clock() -> Clock {
    Arc::new(Instant::now)
}

/// A per-vTPM allowance: `burst` at once, then one more per `interval` (zero: no limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Requests allowed back to back.
    pub burst: u32,
    /// Time to earn one more.
    pub interval: Duration,
}

impl Rate {
    /// No limit.
    pub const UNLIMITED: Rate = Rate { burst: 1, interval: Duration::ZERO };
}

/// The daemon's default SAVEHASHKEY allowance per vTPM: 32 at once (a guest's boot, a burst of
/// provisioning), then ten a second.
pub const SAVE_RATE: Rate = Rate { burst: 32, interval: Duration::from_millis(100) };

/// The daemon's default counter window: at most one hardware NV write a minute for saves, so a
/// guest looping on NV writes for an hour costs the hardware about 60.
pub const COUNTER_WINDOW: Duration = Duration::from_secs(60);

/// Token buckets, one per vTPM.
#[derive(Debug)]
pub struct Buckets {
    /// The allowance.
    pub rate: Rate,
    tokens: HashMap<[u8; 16], (f64, Instant)>,
}

impl Buckets {
    /// Every vTPM starts with a full bucket.
    pub fn new(rate: Rate) -> Self {
        Self { rate, tokens: HashMap::new() }
    }

    /// Spends one of `uuid`'s tokens for request `what`, or refuses it with [`Error::Busy`]
    /// (logged, naming the vTPM).
    pub fn spend(&mut self, uuid: &[u8; 16], now: Instant, what: &str) -> Result<()> {
        if self.take(uuid, now) {
            return Ok(());
        }
        let Rate { burst, interval } = self.rate;
        log::warn!("vTPM {}: {what} refused, over its rate ({burst} at once, one per {interval:?})", uuid_str(uuid));
        Err(Error::Busy(format!("{what}: over the rate of one per {interval:?}")))
    }

    fn take(&mut self, uuid: &[u8; 16], now: Instant) -> bool {
        let Rate { burst, interval } = self.rate;
        if interval.is_zero() {
            return true;
        }
        let burst = f64::from(burst.max(1));
        let (tokens, at) = self.tokens.entry(*uuid).or_insert((burst, now));
        *tokens = (*tokens + now.saturating_duration_since(*at).as_secs_f64() / interval.as_secs_f64()).min(burst);
        *at = now;
        if *tokens < 1.0 {
            return false;
        }
        *tokens -= 1.0;
        true
    }
}

/// When the hardware counter is incremented. A commit that may wait ([`Anchor::Batched`]) is
/// written under the counter's next value without incrementing it if the counter was
/// incremented less than `window` ago; one increment at the end of the window then covers every
/// commit made in it. Any other commit, or one after a quiet window, increments at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterSchedule {
    /// At most one increment per this long for batched commits (zero: one per commit).
    pub window: Duration,
    last: Option<Instant>,
    due: Option<Instant>,
    /// Failed increments in a row (each waits twice as long before the next try).
    failures: u32,
}

/// How soon a commit must be anchored in the hardware counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anchor {
    /// At once: an update whose rollback would matter beyond one vTPM's own state (an export,
    /// a deletion, a revoked approval, a binding).
    Now,
    /// Within the window: a vTPM's state save.
    Batched,
}

/// How long a failed increment waits before the next try, doubling to [`RETRY_MAX`] (the
/// commit that needed it is durable already; the next commit retries too).
const RETRY: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(64);

impl CounterSchedule {
    /// One increment per `window` at most.
    pub fn new(window: Duration) -> Self {
        Self { window, last: None, due: None, failures: 0 }
    }

    /// After a commit: whether its increment may wait (then it is due at the window's end),
    /// rather than be made now.
    pub fn defer(&mut self, anchor: Anchor, now: Instant) -> bool {
        let Some(last) = self.last else { return false };
        if anchor == Anchor::Now || self.window.is_zero() || now.saturating_duration_since(last) >= self.window {
            return false;
        }
        self.due.get_or_insert(last + self.window);
        true
    }

    /// The counter reached the newest commit's value.
    pub fn incremented(&mut self, now: Instant) {
        self.last = Some(now);
        self.due = None;
        self.failures = 0;
    }

    /// An increment failed: try again later, later still after each failure in a row.
    pub fn failed(&mut self, now: Instant) {
        self.due = Some(now + RETRY.saturating_mul(1 << self.failures.min(6)).min(RETRY_MAX));
        self.failures += 1;
    }

    /// Nothing is owed any more (the manager halted, or the store was rebased).
    pub fn clear(&mut self) {
        self.due = None;
    }

    /// When the owed increment is due, if one is owed.
    pub fn due(&self) -> Option<Instant> {
        self.due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_one_per_interval() {
        let t0 = Instant::now();
        let mut b = Buckets::new(Rate { burst: 3, interval: Duration::from_millis(100) });
        let u = [1u8; 16];
        assert!((0..3).all(|_| b.take(&u, t0)));
        assert!(!b.take(&u, t0));
        assert!(b.take(&[2u8; 16], t0), "another vTPM has its own bucket");
        assert!(!b.take(&u, t0 + Duration::from_millis(50)));
        assert!(b.take(&u, t0 + Duration::from_millis(101)));
        assert!(!b.take(&u, t0 + Duration::from_millis(102)));
        let mut free = Buckets::new(Rate::UNLIMITED);
        assert!((0..1000).all(|_| free.take(&u, t0)));
    }

    #[test]
    fn batched_commits_share_one_increment_per_window() {
        let t0 = Instant::now();
        let w = Duration::from_secs(60);
        let mut s = CounterSchedule::new(w);
        assert!(!s.defer(Anchor::Batched, t0), "nothing incremented yet: at once");
        s.incremented(t0);
        let t1 = t0 + Duration::from_secs(1);
        assert!(s.defer(Anchor::Batched, t1));
        assert_eq!(s.due(), Some(t0 + w));
        assert!(s.defer(Anchor::Batched, t1 + Duration::from_secs(5)));
        assert_eq!(s.due(), Some(t0 + w), "a later commit does not push the deadline");
        assert!(!s.defer(Anchor::Now, t1), "a management update is anchored at once");
        s.incremented(t0 + w);
        assert_eq!(s.due(), None);
        assert!(!s.defer(Anchor::Batched, t0 + w + w), "after a quiet window: at once");
        let mut off = CounterSchedule::new(Duration::ZERO);
        off.incremented(t0);
        assert!(!off.defer(Anchor::Batched, t0), "window 0: every commit increments");
        s.failed(t0 + w);
        assert_eq!(s.due(), Some(t0 + w + RETRY));
        s.failed(t0 + w);
        assert_eq!(s.due(), Some(t0 + w + 2 * RETRY), "the next try waits longer");
        (0..10).for_each(|_| s.failed(t0));
        assert_eq!(s.due(), Some(t0 + RETRY_MAX));
        s.incremented(t0 + w);
        s.failed(t0 + w);
        assert_eq!(s.due(), Some(t0 + w + RETRY), "a success starts over");
    }
}
