//! What each served model's recent requests looked like, for
//! `GET /v1/weir/report`: the finished requests of the last [`WINDOW`]
//! (at most [`MAX_KEPT`]), their success rate and latency percentiles, and
//! the grade and advice of [`weir_crds::performance`].

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use weir_crds::performance::Figures;

/// How far back a report looks.
pub const WINDOW: Duration = Duration::from_secs(300);
/// Most requests kept for it.
pub const MAX_KEPT: usize = 10_000;

/// One finished request.
#[derive(Clone, Copy, Debug)]
struct Finished {
    at: Instant,
    ok: bool,
    e2e: Duration,
    ttft: Option<Duration>,
}

/// The finished requests of one model over the window.
#[derive(Debug, Default)]
pub struct RecentRequests {
    kept: Mutex<VecDeque<Finished>>,
}

impl RecentRequests {
    /// Records a request that ended at `at`.
    pub fn record(&self, at: Instant, ok: bool, e2e: Duration, ttft: Option<Duration>) {
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        kept.push_back(Finished { at, ok, e2e, ttft });
        while kept.len() > MAX_KEPT || kept.front().is_some_and(|f| at - f.at > WINDOW) {
            kept.pop_front();
        }
    }

    /// The figures of the requests that ended within the window before
    /// `now`.
    pub fn figures(&self, now: Instant) -> Figures {
        let kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        let recent: Vec<&Finished> = kept
            .iter()
            .filter(|f| now.saturating_duration_since(f.at) <= WINDOW)
            .collect();
        let ms = |d: Duration| (d.as_secs_f64() * 10_000.0).round() / 10.0;
        let mut e2e: Vec<f64> = recent.iter().map(|f| ms(f.e2e)).collect();
        let mut ttft: Vec<f64> = recent.iter().filter_map(|f| f.ttft.map(ms)).collect();
        let ok = recent.iter().filter(|f| f.ok).count();
        Figures {
            window_seconds: WINDOW.as_secs(),
            requests: recent.len() as u64,
            success_rate: if recent.is_empty() {
                1.0
            } else {
                ok as f64 / recent.len() as f64
            },
            p50_latency_ms: percentile(&mut e2e, 0.5),
            p95_latency_ms: percentile(&mut e2e, 0.95),
            p50_ttft_ms: percentile(&mut ttft, 0.5),
        }
    }
}

/// The `q` quantile of `values` (nearest rank), 0 when empty.
fn percentile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_cover_the_window_only() {
        let recent = RecentRequests::default();
        let t0 = Instant::now();
        for i in 0..10u64 {
            let ms = Duration::from_millis(100 * (i + 1));
            recent.record(t0, i != 0, ms, Some(ms / 10));
        }
        let f = recent.figures(t0);
        assert_eq!(f.requests, 10);
        assert!((f.success_rate - 0.9).abs() < 1e-9);
        assert_eq!(f.p50_latency_ms, 500.0);
        assert_eq!(f.p95_latency_ms, 1000.0);
        assert_eq!(f.p50_ttft_ms, 50.0);
        // Past the window they no longer count.
        let later = t0 + WINDOW + Duration::from_secs(1);
        assert_eq!(recent.figures(later).requests, 0);
        recent.record(later, true, Duration::from_millis(5), None);
        assert_eq!(recent.figures(later).requests, 1, "older ones dropped");
    }
}
