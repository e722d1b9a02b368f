//! Grades: the operator keeps the figures it collects over the last
//! [`WINDOW`] and turns what happened in that window into each Model's
//! performance report ([`weir_crds::performance`]): requests, success rate,
//! median and 95th percentile latency, median time to first token, the
//! grade, whether it is in alert, and advice.

use std::collections::{BTreeMap, VecDeque};

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use weir_crds::performance::{Figures, Load, PerformanceReport};

use crate::scrape::ModelFigures;

/// How far back a report looks.
pub const WINDOW: SignedDuration = SignedDuration::from_secs(300);

/// Collections of the last [`WINDOW`], oldest first.
#[derive(Debug, Default)]
pub struct History {
    snapshots: VecDeque<(Timestamp, BTreeMap<String, ModelFigures>)>,
}

impl History {
    /// Records a collection made at `now`, forgetting those older than the
    /// window (the oldest one inside it is kept as the baseline).
    pub fn push(&mut self, now: Timestamp, figures: BTreeMap<String, ModelFigures>) {
        self.snapshots.push_back((now, figures));
        while self.snapshots.len() > 2 && self.snapshots[1].0 + WINDOW <= now {
            self.snapshots.pop_front();
        }
    }

    /// The report of `served` over the window, if it had requests.
    pub fn report(&self, served: &str) -> Option<PerformanceReport> {
        let (now, latest) = self.snapshots.back()?;
        let latest = latest.get(served)?;
        let (since, base) = self.snapshots.front()?;
        let recent = match base.get(served) {
            Some(base) if !std::ptr::eq(base, latest) => latest.since(base),
            _ => latest.clone(),
        };
        let seconds = now.duration_since(*since).as_secs().max(0) as u64;
        let load = Load {
            waiting: latest.waiting,
            kv_usage: latest.kv_usage,
        };
        PerformanceReport::of(figures(&recent, seconds), load)
    }
}

/// The report's figures from what was collected in a window.
pub fn figures(recent: &ModelFigures, window_seconds: u64) -> Figures {
    let requests = recent.successes + recent.failures;
    let ms = |q: Option<f64>| q.map_or(0.0, |s| (s * 1000.0 * 10.0).round() / 10.0);
    Figures {
        window_seconds,
        requests: requests.max(0.0) as u64,
        success_rate: if requests > 0.0 {
            recent.successes / requests
        } else {
            1.0
        },
        p50_latency_ms: ms(recent.e2e.quantile(0.5)),
        p95_latency_ms: ms(recent.e2e.quantile(0.95)),
        p50_ttft_ms: ms(recent.ttft.quantile(0.5)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scrape::Histogram;

    fn hist(values_ms: &[f64]) -> Histogram {
        let bounds = [0.05, 0.1, 0.2, 0.5, 1.0, 2.0, f64::INFINITY];
        Histogram {
            buckets: bounds
                .iter()
                .map(|&le| {
                    (
                        le,
                        values_ms.iter().filter(|v| **v / 1000.0 <= le).count() as f64,
                    )
                })
                .collect(),
            sum: values_ms.iter().sum::<f64>() / 1000.0,
            count: values_ms.len() as f64,
        }
    }

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    #[test]
    fn a_report_covers_only_the_window() {
        let mut history = History::default();
        // Before the window: 100 failures, slow.
        let old = ModelFigures {
            successes: 0.0,
            failures: 100.0,
            e2e: hist(&[1500.0; 100]),
            ttft: hist(&[1500.0; 100]),
            ..ModelFigures::default()
        };
        history.push(at(0), BTreeMap::from([("m".to_owned(), old.clone())]));
        // In the window: 200 quick successes on top.
        let mut now = old.clone();
        now.successes = 200.0;
        now.e2e.add(&hist(&[80.0; 200]));
        now.ttft.add(&hist(&[30.0; 200]));
        history.push(at(400), BTreeMap::from([("m".to_owned(), old)]));
        history.push(at(700), BTreeMap::from([("m".to_owned(), now)]));
        let report = history.report("m").unwrap();
        assert_eq!(report.figures.requests, 200);
        assert_eq!(report.figures.success_rate, 1.0);
        assert!(report.figures.p50_ttft_ms <= 50.0, "{:?}", report.figures);
        assert_eq!(report.figures.window_seconds, 300);
        assert_eq!(report.grade, weir_crds::performance::Grade::APlus);
        assert!(!report.alert);
        assert_eq!(history.report("other"), None);
    }
}
