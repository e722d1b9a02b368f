//! Autoscaling a Model between its min and max replicas, as the Kubernetes
//! HPA does: the raw recommendation is `ceil(current × observed / target)`
//! with a 10 % tolerance; scale-up follows the lowest recommendation within
//! the scale-up stabilization window and scale-down the highest within the
//! scale-down window, so brief spikes and dips do not flap replicas.
//!
//! Guarantees: the result is always within `[min, max]`; with no load
//! figures the replica count is kept (clamped).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use weir_crds::model::{AutoscaleMetric, ReplicaPolicy};

/// Relative deviation from the target that causes no change.
const TOLERANCE: f64 = 0.1;

/// Recommendations remembered for the stabilization windows.
#[derive(Clone, Debug, Default)]
pub struct ScaleState {
    /// (when, recommendation, whether it is the seed taken at start).
    history: VecDeque<(Instant, u32, bool)>,
}

/// The per-replica load figure the policy targets.
pub fn target(policy: &ReplicaPolicy) -> f64 {
    match policy.metric {
        AutoscaleMetric::QueueDepth => f64::from(policy.target_queue_depth),
        AutoscaleMetric::KvCacheUsage => policy.target_kv_cache_usage,
    }
}

/// The replica count for now. `observed` is the mean per-replica figure
/// (queue depth or KV usage) over ready replicas, `None` without data.
pub fn desired_replicas(
    policy: &ReplicaPolicy,
    current: u32,
    observed: Option<f64>,
    state: &mut ScaleState,
    now: Instant,
) -> u32 {
    let (min, max) = (policy.min, policy.max.max(policy.min));
    let clamp = |n: u32| n.clamp(min, max);
    let Some(observed) = observed.filter(|o| o.is_finite()) else {
        return clamp(current);
    };
    let goal = target(policy);
    let raw = if current == 0 {
        // From zero, any load asks for the minimum non-zero count.
        if observed > 0.0 { 1 } else { 0 }
    } else {
        let ratio = observed / goal;
        if (ratio - 1.0).abs() <= TOLERANCE {
            current
        } else {
            (f64::from(current) * ratio).ceil() as u32
        }
    };
    let raw = clamp(raw);
    if state.history.is_empty() {
        // The current count is the first recommendation, so that a window
        // must pass before a change (a blip right after start does not count).
        state.history.push_back((now, clamp(current), true));
    }
    state.history.push_back((now, raw, false));
    let keep = Duration::from_secs(u64::from(
        policy
            .scale_up_stabilization_seconds
            .max(policy.scale_down_stabilization_seconds),
    ));
    while state
        .history
        .front()
        .is_some_and(|(t, _, _)| now.duration_since(*t) > keep)
    {
        state.history.pop_front();
    }
    let within = |secs: u32| {
        let window = Duration::from_secs(u64::from(secs));
        // A zero window means "act at once": the start seed does not hold it back.
        state
            .history
            .iter()
            .filter(move |(t, _, seed)| now.duration_since(*t) <= window && !(secs == 0 && *seed))
            .map(|(_, r, _)| *r)
    };
    let up = within(policy.scale_up_stabilization_seconds)
        .min()
        .unwrap_or(raw);
    let down = within(policy.scale_down_stabilization_seconds)
        .max()
        .unwrap_or(raw);
    clamp(if raw > current {
        up.max(current)
    } else if raw < current {
        down.min(current)
    } else {
        current
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> ReplicaPolicy {
        ReplicaPolicy {
            min: 1,
            max: 5,
            target_queue_depth: 4,
            scale_up_stabilization_seconds: 30,
            scale_down_stabilization_seconds: 120,
            ..Default::default()
        }
    }

    /// Runs a timeline of (seconds, observed) samples every 10 s.
    fn run(samples: &[(u64, f64)], start: u32) -> Vec<u32> {
        let t0 = Instant::now();
        let mut state = ScaleState::default();
        let mut current = start;
        samples
            .iter()
            .map(|&(s, o)| {
                current = desired_replicas(
                    &policy(),
                    current,
                    Some(o),
                    &mut state,
                    t0 + Duration::from_secs(s),
                );
                current
            })
            .collect()
    }

    #[test]
    fn sustained_load_scales_up_within_the_window_and_back_down_later() {
        // Queue of 12 per replica against a target of 4: wants 3× replicas.
        let mut timeline: Vec<(u64, f64)> = (0..=6).map(|i| (i * 10, 12.0)).collect();
        let up = run(&timeline, 1);
        assert_eq!(
            up[0], 1,
            "a single sample inside the window does not scale yet"
        );
        assert!(
            up[..4].iter().all(|&r| r == 1),
            "no change within the 30 s window: {up:?}"
        );
        assert!(up[4..].iter().all(|&r| r >= 3), "{up:?}");
        assert!(up.iter().all(|&r| r <= 5));
        // Load stops: replicas stay for the 120 s down window, then drop to min.
        timeline.extend((7..=25).map(|i| (i * 10, 0.0)));
        let all = run(&timeline, 1);
        let peak = *all.iter().max().unwrap();
        assert_eq!(all[7..18].iter().copied().max(), Some(peak), "{all:?}");
        assert_eq!(*all.last().unwrap(), 1, "{all:?}");
    }

    #[test]
    fn bounds_tolerance_and_missing_data() {
        let mut state = ScaleState::default();
        let now = Instant::now();
        let p = ReplicaPolicy {
            scale_up_stabilization_seconds: 0,
            ..policy()
        };
        assert_eq!(
            desired_replicas(
                &p,
                2,
                Some(1000.0),
                &mut state,
                now + Duration::from_secs(1)
            ),
            5
        );
        assert_eq!(
            desired_replicas(&p, 2, Some(4.3), &mut ScaleState::default(), now),
            2,
            "inside 10 % of target"
        );
        assert_eq!(
            desired_replicas(&p, 9, None, &mut ScaleState::default(), now),
            5,
            "clamped without data"
        );
        assert_eq!(
            desired_replicas(&p, 0, None, &mut ScaleState::default(), now),
            1
        );
    }
}
