//! A circuit breaker: after `threshold` consecutive failures it opens and
//! fails calls fast for `open_for`; then one probe is let through (half-open)
//! and its outcome closes or reopens it. Used around each model's engine.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

/// Breaker state for metrics: 0 closed, 1 open, 2 half-open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls pass.
    Closed = 0,
    /// Calls fail fast.
    Open = 1,
    /// One probe is allowed.
    HalfOpen = 2,
}

/// A thread-safe circuit breaker.
#[derive(Debug)]
pub struct CircuitBreaker {
    state: Mutex<State>,
    threshold: u32,
    open_for: Duration,
    enabled: bool,
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(threshold: u32, open_for: Duration, enabled: bool) -> Self {
        Self {
            state: Mutex::new(State::Closed { failures: 0 }),
            threshold: threshold.max(1),
            open_for,
            enabled,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether a call may proceed now; `Err` carries the time until the next
    /// probe.
    pub fn allow(&self, now: Instant) -> Result<(), Duration> {
        if !self.enabled {
            return Ok(());
        }
        let mut state = self.lock();
        match *state {
            State::Closed { .. } => Ok(()),
            State::Open { until } if now < until => Err(until - now),
            State::Open { .. } => {
                *state = State::HalfOpen { probing: true };
                Ok(())
            }
            State::HalfOpen { probing: true } => Err(Duration::from_secs(1)),
            State::HalfOpen { probing: false } => {
                *state = State::HalfOpen { probing: true };
                Ok(())
            }
        }
    }

    /// Records a call's outcome.
    pub fn record(&self, success: bool, now: Instant) {
        if !self.enabled {
            return;
        }
        let mut state = self.lock();
        *state = match (*state, success) {
            (_, true) => State::Closed { failures: 0 },
            (State::Closed { failures }, false) if failures + 1 < self.threshold => State::Closed {
                failures: failures + 1,
            },
            (_, false) => State::Open {
                until: now + self.open_for,
            },
        };
    }

    /// The current state.
    pub fn state(&self) -> BreakerState {
        match *self.lock() {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_then_probes_once() {
        let b = CircuitBreaker::new(3, Duration::from_secs(10), true);
        let t0 = Instant::now();
        for _ in 0..2 {
            b.record(false, t0);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        b.record(false, t0);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.allow(t0 + Duration::from_secs(5)).is_err());
        let later = t0 + Duration::from_secs(11);
        assert!(b.allow(later).is_ok());
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.allow(later).is_err(), "only one probe while half-open");
        b.record(true, later);
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.allow(later).is_ok());
    }

    #[test]
    fn failed_probe_reopens_and_success_resets_count() {
        let b = CircuitBreaker::new(2, Duration::from_secs(1), true);
        let t0 = Instant::now();
        b.record(false, t0);
        b.record(true, t0);
        b.record(false, t0);
        assert_eq!(b.state(), BreakerState::Closed);
        b.record(false, t0);
        let later = t0 + Duration::from_secs(2);
        assert!(b.allow(later).is_ok());
        b.record(false, later);
        assert_eq!(b.state(), BreakerState::Open);
    }
}
