//! Scale to zero and back, for Models with `replicas.min: 0`. The
//! autoscaler ([`crate::autoscale`]) never goes below one replica; this
//! rule takes a Model to zero after `scaleToZeroAfterSeconds` of idleness
//! and back to one as soon as an agent holds a request for it.
//!
//! Idle means, in the figures collected from every agent: the request
//! counters (`weir_requests_total`) did not move, and nothing is running,
//! waiting or held (`weir_requests_held`). Time counts from the last
//! decision that saw activity; while no agent reports the Model at all
//! (its replica is still loading, or unreachable) it is not idle, so a
//! slow first load never scales it away.
//!
//! Guarantees: a Model with `min` above zero is never touched; a held
//! request scales a Model at zero to one at once, whatever the autoscaler's
//! stabilization windows say; a Model with held requests is never scaled to
//! zero.

use std::time::{Duration, Instant};

use weir_crds::model::ReplicaPolicy;

use crate::scrape::ModelFigures;

/// When a Model was last seen busy, and its request count then.
#[derive(Clone, Debug, Default)]
pub struct IdleState {
    requests: Option<f64>,
    active_at: Option<Instant>,
}

/// A move to or from zero, for the Model's event.
#[derive(Clone, Debug, PartialEq)]
pub enum ZeroChange {
    /// Scaled to zero after this long without requests.
    ToZero(Duration),
    /// Scaled from zero because agents hold this many requests.
    FromZero(f64),
}

impl ZeroChange {
    /// The event's reason and note.
    pub fn event(&self, served: &str) -> (&'static str, String) {
        match self {
            Self::ToZero(idle) => (
                "ScaledToZero",
                format!(
                    "`{served}` had no requests for {} s: scaled to zero; the next request \
                     is held and scales it to one",
                    idle.as_secs()
                ),
            ),
            Self::FromZero(held) => (
                "ScaledFromZero",
                format!("{held} request(s) held for `{served}`: scaled to one replica"),
            ),
        }
    }
}

/// The policy the autoscaler follows: `min` at least one (only this rule
/// goes to zero).
pub fn autoscaler_policy(policy: &ReplicaPolicy) -> ReplicaPolicy {
    ReplicaPolicy {
        min: policy.min.max(1).min(policy.max),
        ..policy.clone()
    }
}

/// The replica count after this rule, from `current` (the count now) and
/// `autoscaled` (the autoscaler's recommendation), with the change to or
/// from zero if there is one. `figures` are the Model's collected figures
/// summed over agents (`None`: no agent reports it).
pub fn decide(
    policy: &ReplicaPolicy,
    current: u32,
    autoscaled: u32,
    figures: Option<&ModelFigures>,
    state: &mut IdleState,
    now: Instant,
) -> (u32, Option<ZeroChange>) {
    if policy.min > 0 {
        return (autoscaled, None);
    }
    let held = figures.map_or(0.0, |f| f.held);
    let requests = figures.map(|f| f.successes + f.failures);
    let busy = figures.is_none_or(|f| f.running + f.waiting + f.held > 0.0);
    let moved = requests.is_some() && requests != state.requests;
    if busy || moved || state.active_at.is_none() {
        state.active_at = Some(now);
    }
    if requests.is_some() {
        state.requests = requests;
    }
    if current == 0 {
        if held > 0.0 {
            return (1.min(policy.max), Some(ZeroChange::FromZero(held)));
        }
        return (0, None);
    }
    let idle = state.active_at.map_or(Duration::ZERO, |t| now - t);
    let window = Duration::from_secs(u64::from(policy.scale_to_zero_after_seconds));
    if idle >= window {
        return (0, Some(ZeroChange::ToZero(idle)));
    }
    (autoscaled.max(1), None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> ReplicaPolicy {
        ReplicaPolicy {
            min: 0,
            max: 3,
            scale_to_zero_after_seconds: 60,
            ..Default::default()
        }
    }

    fn figures(requests: f64, running: f64, held: f64) -> ModelFigures {
        ModelFigures {
            successes: requests,
            running,
            held,
            ..Default::default()
        }
    }

    /// Decisions every 10 s over `samples` (figures at each), from `start`
    /// replicas, with the autoscaler recommending the current count.
    fn timeline(start: u32, samples: &[Option<ModelFigures>]) -> Vec<(u32, Option<ZeroChange>)> {
        let t0 = Instant::now();
        let mut state = IdleState::default();
        let mut current = start;
        samples
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let now = t0 + Duration::from_secs(10 * i as u64);
                let d = decide(&policy(), current, current, f.as_ref(), &mut state, now);
                current = d.0;
                d
            })
            .collect()
    }

    #[test]
    fn idle_for_the_window_scales_to_zero() {
        // Requests at 0 and 10 s, then none: idle from 10 s, zero at 70 s.
        let mut samples = vec![Some(figures(5.0, 0.0, 0.0)), Some(figures(9.0, 0.0, 0.0))];
        samples.extend((0..6).map(|_| Some(figures(9.0, 0.0, 0.0))));
        let d = timeline(1, &samples);
        let counts: Vec<u32> = d.iter().map(|x| x.0).collect();
        assert_eq!(counts, [1, 1, 1, 1, 1, 1, 1, 0]);
        assert_eq!(d[7].1, Some(ZeroChange::ToZero(Duration::from_secs(60))));
        assert!(d[..7].iter().all(|x| x.1.is_none()));
    }

    #[test]
    fn running_or_held_requests_or_missing_figures_are_not_idle() {
        // The counter stands still but a long request runs.
        let running: Vec<_> = (0..10).map(|_| Some(figures(3.0, 1.0, 0.0))).collect();
        assert!(timeline(1, &running).iter().all(|d| d.0 == 1));
        // Held somewhere (the replica is loading): never to zero.
        let held: Vec<_> = (0..10).map(|_| Some(figures(3.0, 0.0, 2.0))).collect();
        assert!(timeline(1, &held).iter().all(|d| d.0 == 1));
        // No agent reports the Model yet (a slow first load).
        let missing: Vec<Option<ModelFigures>> = vec![None; 10];
        assert!(timeline(2, &missing).iter().all(|d| d.0 == 2));
    }

    #[test]
    fn a_held_request_scales_from_zero_at_once() {
        let d = timeline(
            0,
            &[
                Some(figures(9.0, 0.0, 0.0)),
                None,
                Some(figures(9.0, 0.0, 3.0)),
            ],
        );
        assert_eq!(d[0], (0, None));
        assert_eq!(d[1], (0, None), "nothing reported: stays at zero");
        assert_eq!(d[2], (1, Some(ZeroChange::FromZero(3.0))));
        // Whatever the autoscaler says about a Model at zero.
        let mut state = IdleState::default();
        let f = figures(0.0, 0.0, 1.0);
        let now = Instant::now();
        assert_eq!(decide(&policy(), 0, 0, Some(&f), &mut state, now).0, 1);
        // The idle clock restarts: it is not scaled away again at once.
        let quiet = figures(0.0, 0.0, 0.0);
        let later = now + Duration::from_secs(59);
        assert_eq!(
            decide(&policy(), 1, 1, Some(&quiet), &mut state, later),
            (1, None)
        );
    }

    #[test]
    fn min_above_zero_is_the_autoscalers_alone() {
        let p = ReplicaPolicy { min: 1, ..policy() };
        let mut state = IdleState::default();
        let quiet = figures(0.0, 0.0, 0.0);
        let t0 = Instant::now();
        for i in 0..100 {
            let now = t0 + Duration::from_secs(10 * i);
            assert_eq!(decide(&p, 2, 2, Some(&quiet), &mut state, now), (2, None));
        }
        assert_eq!(autoscaler_policy(&policy()).min, 1);
        assert_eq!(autoscaler_policy(&p).min, 1);
    }
}
