//! Rate limits for warnings that a client can trigger at will (forged cookies, spoofed headers,
//! malformed requests): a flood of them must not fill the disk. Each kind of warning gets a
//! [`LogLimit`]; a line that is let through says how many were held back since the last one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// Lets at most one line through per interval.
#[derive(Debug)]
pub struct LogLimit {
    interval_ms: u64,
    /// Milliseconds since [`origin`] before which no line goes through.
    next_ms: AtomicU64,
    suppressed: AtomicU64,
}

/// A process-wide monotonic origin, so that limits can be `static`.
fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

impl LogLimit {
    /// At most one line per `interval_ms` milliseconds.
    pub const fn new(interval_ms: u64) -> Self {
        LogLimit {
            interval_ms,
            next_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(held back since the last line)` when a line may be written now, `None` otherwise.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(origin().elapsed().as_millis() as u64)
    }

    fn allow_at(&self, now_ms: u64) -> Option<u64> {
        let next = self.next_ms.load(Ordering::Relaxed);
        if now_ms >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now_ms + self.interval_ms,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_held_back() {
        let l = LogLimit::new(1000);
        assert_eq!(l.allow_at(5), Some(0));
        for t in 6..1005 {
            assert_eq!(l.allow_at(t), None);
        }
        assert_eq!(l.allow_at(1005), Some(999));
        assert_eq!(l.allow_at(1006), None);
        assert_eq!(l.allow_at(5000), Some(1));
    }
}
