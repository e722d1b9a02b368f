//! Admission control for one model: a bounded number of outstanding
//! requests (running plus queued, from the BatchPolicy), with a smaller share
//! of the queue for lower priority classes so that Background work is shed
//! first under overload. Over the bound a request is answered 429 with
//! `Retry-After` at once, never left to time out.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use weir_crds::batch_policy::BatchPolicySpec;
use weir_engine::scheduler::Priority;

/// Share of the queue each class may fill, Critical first.
const CLASS_SHARE: [f64; 5] = [1.0, 1.0, 0.9, 0.7, 0.5];

/// Admission state of one model.
#[derive(Debug)]
pub struct Admission {
    outstanding: Arc<AtomicUsize>,
    running_slots: usize,
    max_queued: usize,
    allow_critical: bool,
    queue_timeout: Duration,
    default_priority: Priority,
}

/// An admitted request; dropping it releases its place.
#[derive(Debug)]
pub struct Permit {
    outstanding: Arc<AtomicUsize>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.outstanding.fetch_sub(1, Ordering::AcqRel);
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
        let share = CLASS_SHARE[priority.index()];
        let limit = self.running_slots + (self.max_queued as f64 * share) as usize;
        let mut current = self.outstanding.load(Ordering::Acquire);
        loop {
            if current + cost > limit {
                return Err(Duration::from_secs(1));
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
