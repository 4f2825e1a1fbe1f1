//! Rate limits for log lines that a client can trigger at will (failed handshakes, framing
//! errors): a flood of bad connections must not turn into a flood of log lines.
//!
//! Each call site owns a [`LogLimit`]; at most [`LINES_PER_WINDOW`] lines pass per
//! [`WINDOW`], and the first line of the next window says how many were suppressed.

pub use crate::limits::broker::LINES_PER_WINDOW;
pub use crate::limits::broker::WINDOW;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A per-call-site limiter; `const`-constructible for `static`s.
#[derive(Debug)]
pub struct LogLimit {
    window: AtomicU64,
    lines: AtomicU64,
    suppressed: AtomicU64,
}

impl Default for LogLimit {
    fn default() -> Self {
        Self::new()
    }
}

fn process_start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(crate::clock::monotonic_now)
}

impl LogLimit {
    /// A limiter with nothing logged yet.
    pub const fn new() -> Self {
        Self {
            window: AtomicU64::new(0),
            lines: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether a line may be logged now; `Some(n)` says yes and how many were suppressed
    /// since the last line that passed.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(process_start().elapsed())
    }

    fn allow_at(&self, since_start: Duration) -> Option<u64> {
        let window = since_start.as_secs() / WINDOW.as_secs() + 1;
        if self.window.swap(window, Ordering::AcqRel) != window {
            self.lines.store(0, Ordering::Release);
        }
        if self.lines.fetch_add(1, Ordering::AcqRel) < LINES_PER_WINDOW {
            Some(self.suppressed.swap(0, Ordering::AcqRel))
        } else {
            self.suppressed.fetch_add(1, Ordering::AcqRel);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_beyond_the_window_budget_are_suppressed_and_reported() {
        let limit = LogLimit::new();
        let t = Duration::from_secs(1);
        for _ in 0..LINES_PER_WINDOW {
            assert_eq!(limit.allow_at(t), Some(0));
        }
        assert_eq!(limit.allow_at(t), None);
        assert_eq!(limit.allow_at(t), None);
        // Next window: the first line reports the two suppressed ones.
        assert_eq!(limit.allow_at(t + WINDOW), Some(2));
        assert_eq!(limit.allow_at(t + WINDOW), Some(0));
    }
}
