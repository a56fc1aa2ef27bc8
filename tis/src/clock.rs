//! Time for the driver's polling loops, behind a trait so tests run every timeout in virtual
//! time.

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// A monotonic clock the driver polls with.
pub trait Clock {
    /// Time since some fixed start.
    fn now(&self) -> Duration;
    /// Waits `d` (a poll interval).
    fn sleep(&self, d: Duration);
}

/// Wall-clock time; polls sleep the thread.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    start: Instant,
}

impl SystemClock {
    /// A clock starting now.
    pub fn new() -> Self {
        Self { start: Instant::now() }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.start.elapsed()
    }
    fn sleep(&self, d: Duration) {
        std::thread::sleep(d)
    }
}

/// Virtual time: `sleep` advances it at once. Clones share the same time, so a register model
/// can see how long the driver has waited.
#[derive(Debug, Clone, Default)]
pub struct FakeClock {
    now: Rc<Cell<Duration>>,
}

impl FakeClock {
    /// A clock at zero.
    pub fn new() -> Self {
        Self::default()
    }
    /// Moves time forward.
    pub fn advance(&self, d: Duration) {
        self.now.set(self.now.get().saturating_add(d));
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Duration {
        self.now.get()
    }
    fn sleep(&self, d: Duration) {
        // At least a nanosecond, so a poll loop always makes progress towards its deadline.
        self.advance(d.max(Duration::from_nanos(1)));
    }
}
