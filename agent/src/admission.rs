//! Admission control for one model: a bounded number of outstanding
//! requests (running plus queued, from the BatchPolicy), with a smaller share
//! of the queue for lower priority classes so that Background work is shed
//! first under overload. Over the bound a request is answered 429 with
//! `Retry-After` at once, never left to time out. The queue is bounded by
//! time as well as by count: from the completion rate measured over the
//! last [`RATE_WINDOW`], a request that would wait longer than the queue
//! timeout (scaled by its class's share) for its turn is refused at once,
//! with `Retry-After` the excess wait, instead of being queued to time out.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use weir_crds::batch_policy::BatchPolicySpec;
use weir_engine::scheduler::Priority;

/// Share of the queue each class may fill, Critical first.
const CLASS_SHARE: [f64; 5] = [1.0, 1.0, 0.9, 0.7, 0.5];

/// How far back completions count toward the measured rate.
pub const RATE_WINDOW: Duration = Duration::from_secs(30);
/// Completions needed in the window before the rate bounds the queue.
const MIN_COMPLETIONS: u64 = 8;

/// Completions per second over the last [`RATE_WINDOW`], in one-second
/// buckets.
#[derive(Debug)]
struct Rate {
    start: Instant,
    /// (second since `start`, completions in it), oldest first.
    buckets: std::collections::VecDeque<(u64, u64)>,
}

impl Rate {
    fn new(start: Instant) -> Self {
        Self {
            start,
            buckets: std::collections::VecDeque::new(),
        }
    }

    fn second(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.start).as_secs()
    }

    fn forget_before(&mut self, now: Instant) {
        let oldest = self.second(now).saturating_sub(RATE_WINDOW.as_secs() - 1);
        while self.buckets.front().is_some_and(|(s, _)| *s < oldest) {
            self.buckets.pop_front();
        }
    }

    fn record(&mut self, at: Instant) {
        let second = self.second(at);
        match self.buckets.back_mut() {
            Some((s, n)) if *s == second => *n += 1,
            _ => self.buckets.push_back((second, 1)),
        }
        self.forget_before(at);
    }

    /// Completions per second, once enough have been seen.
    fn per_second(&mut self, now: Instant) -> Option<f64> {
        self.forget_before(now);
        let count: u64 = self.buckets.iter().map(|(_, n)| n).sum();
        let first = self.buckets.front()?.0;
        if count < MIN_COMPLETIONS {
            return None;
        }
        let span = (self.second(now) - first + 1).clamp(1, RATE_WINDOW.as_secs());
        Some(count as f64 / span as f64)
    }
}

/// Admission state of one model.
#[derive(Debug)]
pub struct Admission {
    outstanding: Arc<AtomicUsize>,
    rate: Arc<Mutex<Rate>>,
    running_slots: usize,
    max_queued: usize,
    allow_critical: bool,
    queue_timeout: Duration,
    default_priority: Priority,
}

/// An admitted request; dropping it releases its place (and counts as a
/// completion for the measured rate).
#[derive(Debug)]
pub struct Permit {
    outstanding: Arc<AtomicUsize>,
    rate: Arc<Mutex<Rate>>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.outstanding.fetch_sub(1, Ordering::AcqRel);
        self.rate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(Instant::now());
    }
}

/// Maps the API's priority class to the engine's.
pub fn engine_priority(class: weir_crds::PriorityClass) -> Priority {
    use weir_crds::PriorityClass as C;
    match class {
        C::Critical => Priority::Critical,
        C::High => Priority::High,
        C::Normal => Priority::Normal,
        C::Low => Priority::Low,
        C::Background => Priority::Background,
    }
}

impl Admission {
    /// Admission for a model running `running_slots` sequences at once.
    pub fn new(policy: &BatchPolicySpec, running_slots: usize) -> Self {
        Self {
            outstanding: Arc::new(AtomicUsize::new(0)),
            rate: Arc::new(Mutex::new(Rate::new(Instant::now()))),
            running_slots,
            max_queued: policy.queue.max_queued as usize,
            allow_critical: policy.priority.allow_critical,
            queue_timeout: Duration::from_secs(u64::from(policy.queue.timeout_seconds)),
            default_priority: engine_priority(policy.priority.default_class),
        }
    }

    /// The class of a request that names `asked` (or none).
    pub fn effective_priority(&self, asked: Option<Priority>) -> Priority {
        match asked.unwrap_or(self.default_priority) {
            Priority::Critical if !self.allow_critical => Priority::High,
            p => p,
        }
    }

    /// How long a request may wait for its first token.
    pub fn queue_timeout(&self) -> Duration {
        self.queue_timeout
    }

    /// Requests admitted and not yet finished.
    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Acquire)
    }

    /// Admits `cost` engine requests of class `priority`, or says how long
    /// to wait before retrying.
    pub fn try_admit(&self, priority: Priority, cost: usize) -> Result<Vec<Permit>, Duration> {
        self.try_admit_at(priority, cost, Instant::now())
    }

    /// How long the last of `queued` requests ahead would wait at the
    /// measured rate, if it is known.
    fn expected_wait(&self, queued: usize, now: Instant) -> Option<Duration> {
        let rate = self
            .rate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .per_second(now)?;
        Some(Duration::from_secs_f64(queued as f64 / rate.max(1e-3)))
    }

    fn try_admit_at(
        &self,
        priority: Priority,
        cost: usize,
        now: Instant,
    ) -> Result<Vec<Permit>, Duration> {
        let share = CLASS_SHARE[priority.index()];
        let limit = self.running_slots + (self.max_queued as f64 * share) as usize;
        let patience = self.queue_timeout.mul_f64(share);
        let mut current = self.outstanding.load(Ordering::Acquire);
        loop {
            if current + cost > limit {
                return Err(Duration::from_secs(1));
            }
            let queued = (current + cost).saturating_sub(self.running_slots);
            if let Some(wait) = self.expected_wait(queued, now).filter(|w| *w > patience) {
                let excess = (wait - patience).as_secs().clamp(1, 60);
                return Err(Duration::from_secs(excess));
            }
            match self.outstanding.compare_exchange_weak(
                current,
                current + cost,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(now) => current = now,
            }
        }
        Ok((0..cost)
            .map(|_| Permit {
                outstanding: self.outstanding.clone(),
                rate: self.rate.clone(),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_queued: u32) -> BatchPolicySpec {
        let mut p = BatchPolicySpec::default();
        p.queue.max_queued = max_queued;
        p
    }

    #[test]
    fn lower_classes_are_shed_first_and_permits_release() {
        let a = Admission::new(&policy(10), 2);
        // Background may fill 2 running + 5 queued.
        let held = a.try_admit(Priority::Background, 7).unwrap();
        assert!(a.try_admit(Priority::Background, 1).is_err());
        // Normal may still use its larger share (2 + 9).
        let normal = a.try_admit(Priority::Normal, 4).unwrap();
        assert!(a.try_admit(Priority::Normal, 1).is_err());
        assert!(a.try_admit(Priority::High, 1).is_ok());
        drop(held);
        drop(normal);
        assert_eq!(a.outstanding(), 0);
        assert_eq!(a.try_admit(Priority::Background, 7).map(|p| p.len()), Ok(7));
    }

    #[test]
    fn the_queue_is_bounded_by_the_expected_wait() {
        let mut p = policy(1000);
        p.queue.timeout_seconds = 4;
        let a = Admission::new(&p, 1);
        let t0 = Instant::now();
        // Before any completion only the count bounds the queue.
        let cold = a.try_admit_at(Priority::Normal, 50, t0).unwrap();
        drop(cold);
        // Two completions a second for 10 s.
        {
            let mut rate = a.rate.lock().unwrap();
            *rate = Rate::new(t0);
            for i in 0..20 {
                rate.record(t0 + Duration::from_millis(500 * i));
            }
        }
        let now = t0 + Duration::from_secs(10);
        // 20 in 11 s: 1.8 a second. Normal waits up to 4 s × 0.9 = 3.6 s:
        // 1 running + 6 queued (3.3 s) fit, a 7th queued (3.85 s) does not.
        let held = a.try_admit_at(Priority::Normal, 7, now).unwrap();
        let refused = a.try_admit_at(Priority::Normal, 1, now).unwrap_err();
        assert!(refused >= Duration::from_secs(1));
        // Background's patience is half the timeout: already over it.
        assert!(a.try_admit_at(Priority::Background, 1, now).is_err());
        drop(held);
        assert_eq!(
            a.try_admit_at(Priority::Normal, 7, now).map(|p| p.len()),
            Ok(7)
        );
        // A rate measured long ago no longer counts.
        let later = now + RATE_WINDOW + Duration::from_secs(5);
        assert_eq!(a.rate.lock().unwrap().per_second(later), None);
    }

    #[test]
    fn critical_is_lowered_unless_allowed() {
        let a = Admission::new(&policy(10), 2);
        assert_eq!(
            a.effective_priority(Some(Priority::Critical)),
            Priority::High
        );
        assert_eq!(a.effective_priority(None), Priority::Normal);
        let mut p = policy(10);
        p.priority.allow_critical = true;
        let a = Admission::new(&p, 2);
        assert_eq!(
            a.effective_priority(Some(Priority::Critical)),
            Priority::Critical
        );
    }
}
