//! The limit arithmetic, shared by the Redis script (which does the same
//! in Lua, see `limits.lua`) and the local fallback: a sliding minute kept
//! as one counter per second, and a count of requests running.
//!
//! Guarantees: within any 60 consecutive seconds (whole seconds, as the
//! buckets are) no more than `limit` units are admitted; a refused
//! request changes nothing; memory is at most 61 buckets per window.

use std::collections::BTreeMap;
use std::time::Duration;

/// Seconds a window covers.
pub const WINDOW_SECS: u64 = 60;

/// Units admitted per second over the last minute.
#[derive(Debug, Default, Clone)]
pub struct Window {
    buckets: BTreeMap<u64, u64>,
}

/// What a window says about an admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    /// The limit.
    pub limit: u64,
    /// Units still free in the window (after this admission, when admitted).
    pub remaining: u64,
    /// Until the oldest units in the window leave it (and free their
    /// share of the limit).
    pub reset: Duration,
}

impl Window {
    fn expire(&mut self, now_ms: u64) {
        let now_s = now_ms / 1000;
        self.buckets.retain(|&s, _| s + WINDOW_SECS > now_s);
    }

    /// Units admitted in the minute ending at `now_ms`.
    pub fn used(&mut self, now_ms: u64) -> u64 {
        self.expire(now_ms);
        self.buckets.values().sum()
    }

    /// Whether `cost` more units fit under `limit` at `now_ms`; `Err`
    /// carries how long until they would.
    pub fn check(&mut self, now_ms: u64, limit: u64, cost: u64) -> Result<Reading, Duration> {
        let used = self.used(now_ms);
        if used + cost <= limit {
            return Ok(self.reading(now_ms, limit, used + cost));
        }
        if cost > limit {
            return Err(Duration::from_secs(WINDOW_SECS));
        }
        // The earliest time enough old units have left the window.
        let need = used + cost - limit;
        let mut freed = 0;
        for (&s, &n) in &self.buckets {
            freed += n;
            if freed >= need {
                return Err(until((s + WINDOW_SECS) * 1000, now_ms));
            }
        }
        Err(Duration::from_secs(WINDOW_SECS))
    }

    /// Adds `cost` units in the second of `now_ms`.
    pub fn add(&mut self, now_ms: u64, cost: u64) {
        *self.buckets.entry(now_ms / 1000).or_default() += cost;
    }

    /// Gives back `units` admitted in second `bucket`, if it is still in
    /// the window.
    pub fn refund(&mut self, bucket: u64, units: u64) {
        if let Some(n) = self.buckets.get_mut(&bucket) {
            *n = n.saturating_sub(units);
        }
    }

    /// The reading with `used` units in the window.
    pub fn reading(&self, now_ms: u64, limit: u64, used: u64) -> Reading {
        let reset = self
            .buckets
            .keys()
            .next()
            .map_or(Duration::ZERO, |&s| until((s + WINDOW_SECS) * 1000, now_ms));
        Reading {
            limit,
            remaining: limit.saturating_sub(used),
            reset,
        }
    }
}

fn until(at_ms: u64, now_ms: u64) -> Duration {
    Duration::from_millis(at_ms.saturating_sub(now_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minute_holds_exactly_the_limit() {
        let mut w = Window::default();
        let t0 = 1_000_000;
        for i in 0..60 {
            let r = w.check(t0 + i * 10, 60, 1).unwrap();
            assert_eq!(r.remaining, 59 - i);
            w.add(t0 + i * 10, 1);
        }
        let wait = w.check(t0 + 700, 60, 1).unwrap_err();
        assert_eq!(wait, Duration::from_millis(60_000 - 700));
        // Still full 59 s later, free once the first second has left.
        assert!(w.check(t0 + 59_999, 60, 1).is_err());
        assert_eq!(w.check(t0 + 60_000, 60, 1).unwrap().remaining, 59);
    }

    #[test]
    fn tokens_reserve_and_refund() {
        let mut w = Window::default();
        let t0 = 5_000;
        w.check(t0, 100, 80).unwrap();
        w.add(t0, 80);
        assert!(w.check(t0 + 1, 100, 30).is_err());
        // The request used 20 of its 80: 60 come back.
        w.refund(t0 / 1000, 60);
        assert_eq!(w.check(t0 + 2, 100, 30).unwrap().remaining, 50);
        // More than the whole limit never fits.
        assert_eq!(
            w.check(t0, 100, 101).unwrap_err(),
            Duration::from_secs(WINDOW_SECS)
        );
    }

    #[test]
    fn retry_after_counts_the_buckets_that_must_leave() {
        let mut w = Window::default();
        w.add(0, 40);
        w.add(10_000, 40);
        // 90 needs 70 free: both buckets must leave, the second at 70 s.
        assert_eq!(
            w.check(20_000, 100, 90).unwrap_err(),
            Duration::from_secs(50)
        );
        assert_eq!(
            w.check(20_000, 100, 50).unwrap_err(),
            Duration::from_secs(40)
        );
    }
}
