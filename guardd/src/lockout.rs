//! Brute-force protection: after a few consecutive failures a user must wait, and the wait
//! doubles with every further failure up to a cap. It is per user (across all services), so an
//! attacker guessing one account cannot lock out anyone else; a success or `guardctl unlock`
//! resets it. The state lives in the store, so a restart does not reset it.

/// When back-off starts and how it grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Consecutive failures allowed before the first wait.
    pub free_failures: u32,
    /// The first wait, in seconds; each further failure doubles it.
    pub first_delay: u64,
    /// The longest wait, in seconds.
    pub max_delay: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            free_failures: 5,
            first_delay: 30,
            max_delay: 3600,
        }
    }
}

impl Backoff {
    /// The wait imposed after `failures` consecutive failures, if any.
    pub fn delay(&self, failures: u32) -> Option<u64> {
        let over = failures.checked_sub(self.free_failures)?;
        let factor = 1u64.checked_shl(over.min(63)).unwrap_or(u64::MAX);
        Some(self.first_delay.saturating_mul(factor).min(self.max_delay))
    }
}

/// A user's failure record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Lockout {
    pub failures: u32,
    /// Unix time before which answers are refused unchecked; 0 when not locked.
    pub until: i64,
}

impl Lockout {
    /// Seconds left to wait at `now`, if locked.
    pub fn remaining(&self, now: i64) -> Option<i64> {
        (self.until > now).then(|| self.until - now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_start_after_the_free_failures_double_and_are_capped() {
        let b = Backoff::default();
        assert_eq!(b.delay(4), None);
        assert_eq!(b.delay(5), Some(30));
        assert_eq!(b.delay(6), Some(60));
        assert_eq!(b.delay(7), Some(120));
        assert_eq!(b.delay(12), Some(3600));
        assert_eq!(b.delay(u32::MAX), Some(3600));
    }

    #[test]
    fn remaining_time() {
        let l = Lockout {
            failures: 5,
            until: 100,
        };
        assert_eq!(l.remaining(70), Some(30));
        assert_eq!(l.remaining(100), None);
    }
}
