//! Adaptive batch limits: within a BatchPolicy's bounds, lower the engine's
//! `maxNumSeqs` / `maxNumBatchedTokens` when the KV cache is nearly full
//! (fewer preemptions), and raise them when requests queue while the KV
//! cache and the GPU have room. The decision is a pure function; a task per
//! model applies it on the policy's interval.

use std::sync::Arc;
use std::time::Duration;

use weir_crds::batch_policy::BatchPolicySpec;

use crate::gpu::GpuMonitor;
use crate::models::ServedModel;

/// Batch limits of one engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most sequences per step.
    pub max_num_seqs: usize,
    /// Most tokens per step.
    pub max_num_batched_tokens: usize,
}

/// What the engine looks like now.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoadSample {
    /// Share of KV blocks in use (0..1).
    pub kv_usage: f64,
    /// Requests waiting.
    pub waiting: u64,
    /// GPU utilization (0..1), when NVML reports one.
    pub gpu_utilization: Option<f64>,
}

fn scale(value: usize, factor: f64, lo: usize, hi: usize) -> usize {
    ((value as f64 * factor).round() as usize).clamp(lo, hi)
}

/// The limits for the next interval.
///
/// Guarantees: the result lies within `[adaptive.min*, policy max*]`; with
/// adaptation disabled it is the policy's maximums; a step changes each limit
/// by at most `adaptive.step` of its value (at least by one).
pub fn next_limits(policy: &BatchPolicySpec, current: Limits, load: LoadSample) -> Limits {
    let a = &policy.adaptive;
    let (max_seqs, max_tokens) = (
        policy.max_num_seqs as usize,
        policy.max_num_batched_tokens as usize,
    );
    let (min_seqs, min_tokens) = (
        (a.min_num_seqs as usize).min(max_seqs),
        (a.min_num_batched_tokens as usize).min(max_tokens),
    );
    if !a.enabled {
        return Limits {
            max_num_seqs: max_seqs,
            max_num_batched_tokens: max_tokens,
        };
    }
    let gpu_busy = load
        .gpu_utilization
        .is_some_and(|u| u >= a.gpu_utilization_high);
    let factor = if load.kv_usage > a.kv_usage_high {
        1.0 - a.step
    } else if load.kv_usage < a.kv_usage_low
        && load.waiting > u64::from(a.queue_depth_high)
        && !gpu_busy
    {
        1.0 + a.step
    } else {
        1.0
    };
    let nudge = |value: usize, lo: usize, hi: usize| {
        let next = scale(value, factor, lo, hi);
        // Make progress on small values, where rounding would stall.
        match next.cmp(&value) {
            std::cmp::Ordering::Equal if factor > 1.0 => (value + 1).min(hi),
            std::cmp::Ordering::Equal if factor < 1.0 => value.saturating_sub(1).max(lo),
            _ => next,
        }
    };
    Limits {
        max_num_seqs: nudge(current.max_num_seqs, min_seqs, max_seqs),
        max_num_batched_tokens: nudge(current.max_num_batched_tokens, min_tokens, max_tokens),
    }
}

/// Runs the adaptive loop for `model` until the model is dropped.
pub fn spawn(model: Arc<ServedModel>, gpu: Arc<GpuMonitor>) {
    let policy = model.batch_policy.clone();
    if !policy.adaptive.enabled {
        return;
    }
    let weak = Arc::downgrade(&model);
    drop(model);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(u64::from(
            policy.adaptive.interval_seconds,
        )));
        loop {
            tick.tick().await;
            let Some(model) = weak.upgrade() else { return };
            let snap = model.engine.stats().snapshot();
            let current = Limits {
                max_num_seqs: snap.max_num_seqs as usize,
                max_num_batched_tokens: snap.max_num_batched_tokens as usize,
            };
            let load = LoadSample {
                kv_usage: snap.kv_usage,
                waiting: snap.waiting,
                gpu_utilization: gpu.utilization(),
            };
            let next = next_limits(&policy, current, load);
            if next != current {
                tracing::info!(model = %model.name, ?current, ?next, ?load, "adaptive batch limits");
                let _ = model
                    .engine
                    .set_limits(next.max_num_seqs, next.max_num_batched_tokens);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> BatchPolicySpec {
        let mut p = BatchPolicySpec {
            max_num_seqs: 64,
            max_num_batched_tokens: 4096,
            ..Default::default()
        };
        p.adaptive.enabled = true;
        p.adaptive.min_num_seqs = 8;
        p.adaptive.min_num_batched_tokens = 512;
        p
    }

    const FULL: Limits = Limits {
        max_num_seqs: 64,
        max_num_batched_tokens: 4096,
    };

    #[test]
    fn a_full_kv_cache_lowers_limits_down_to_the_minimums() {
        let hot = LoadSample {
            kv_usage: 0.97,
            waiting: 50,
            gpu_utilization: None,
        };
        let mut limits = FULL;
        let once = next_limits(&policy(), limits, hot);
        assert!(
            once.max_num_seqs < 64 && once.max_num_seqs >= 57,
            "{once:?}"
        );
        for _ in 0..100 {
            limits = next_limits(&policy(), limits, hot);
        }
        assert_eq!(
            limits,
            Limits {
                max_num_seqs: 8,
                max_num_batched_tokens: 512
            }
        );
    }

    #[test]
    fn queueing_with_room_raises_limits_up_to_the_maximums_unless_the_gpu_is_busy() {
        let room = LoadSample {
            kv_usage: 0.2,
            waiting: 40,
            gpu_utilization: Some(0.5),
        };
        let mut limits = Limits {
            max_num_seqs: 8,
            max_num_batched_tokens: 512,
        };
        assert!(next_limits(&policy(), limits, room).max_num_seqs > 8);
        for _ in 0..100 {
            limits = next_limits(&policy(), limits, room);
        }
        assert_eq!(limits, FULL);
        let busy = LoadSample {
            gpu_utilization: Some(0.99),
            ..room
        };
        let low = Limits {
            max_num_seqs: 8,
            max_num_batched_tokens: 512,
        };
        assert_eq!(next_limits(&policy(), low, busy), low);
        let quiet = LoadSample { waiting: 0, ..room };
        assert_eq!(next_limits(&policy(), low, quiet), low);
    }

    #[test]
    fn disabled_means_the_policy_maximums() {
        let mut p = policy();
        p.adaptive.enabled = false;
        let hot = LoadSample {
            kv_usage: 0.99,
            waiting: 0,
            gpu_utilization: None,
        };
        assert_eq!(
            next_limits(
                &p,
                Limits {
                    max_num_seqs: 3,
                    max_num_batched_tokens: 99
                },
                hot
            ),
            FULL
        );
    }
}
