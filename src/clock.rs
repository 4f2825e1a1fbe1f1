//! Time, as the one place that reads the wall clock.
//!
//! The engine never reads a clock: every operation takes `now` ([`Millis`], milliseconds since the
//! Unix epoch) as a parameter. The server asks a [`Clock`] for it; tests use [`ManualClock`] and
//! advance it by hand, so 12-hour visibility timeouts and 15-day retention run in microseconds.
//!
//! Durations that only measure or pace work (fsync latency, rate limits, the log's maintenance
//! interval) read the monotonic clock through [`monotonic_now`]; deadlines of async code use
//! Tokio's clock (`tokio::time::Instant`), which tests pause and advance. Clippy refuses
//! `SystemTime::now` and `std::time::Instant::now` anywhere else (`.clippy.toml`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Milliseconds since the Unix epoch.
pub type Millis = u64;

/// The monotonic clock: for measuring durations and pacing work, never for the engine's time.
/// The one reader of `std::time::Instant::now` (clippy refuses it elsewhere).
#[allow(clippy::disallowed_methods)]
pub fn monotonic_now() -> std::time::Instant {
    std::time::Instant::now()
}

/// A source of the current time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current time in milliseconds since the Unix epoch.
    fn now_ms(&self) -> Millis;
}

/// The wall clock. Never goes backwards as seen through this type: a step back of the system
/// clock is held at the last value returned, so engine deadlines stay ordered.
#[derive(Debug, Default)]
pub struct SystemClock {
    last_ms: AtomicU64,
}

impl SystemClock {
    /// A new wall clock.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Clock for SystemClock {
    #[allow(clippy::disallowed_methods)]
    fn now_ms(&self) -> Millis {
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        let previous = self.last_ms.fetch_max(wall, Ordering::Relaxed);
        wall.max(previous)
    }
}

/// A clock that moves only when told to. Cloning shares the same time.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock standing at `start_ms`.
    pub fn new(start_ms: Millis) -> Self {
        Self {
            now: Arc::new(AtomicU64::new(start_ms)),
        }
    }

    /// Moves the clock forward by `delta_ms`.
    pub fn advance_ms(&self, delta_ms: u64) {
        self.now.fetch_add(delta_ms, Ordering::Relaxed);
    }

    /// Moves the clock forward by `seconds`.
    pub fn advance_seconds(&self, seconds: u64) {
        self.advance_ms(seconds.saturating_mul(1000));
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> Millis {
        self.now.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_advanced() {
        let clock = ManualClock::new(1_000);
        assert_eq!(clock.now_ms(), 1_000);
        clock.advance_seconds(43_200);
        assert_eq!(clock.now_ms(), 1_000 + 43_200_000);
    }

    #[test]
    fn system_clock_is_monotonic_through_the_type() {
        let clock = SystemClock::new();
        let a = clock.now_ms();
        let b = clock.now_ms();
        assert!(b >= a);
        assert!(a > 1_600_000_000_000, "wall clock looks wrong: {a}");
    }
}
