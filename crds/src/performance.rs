//! Performance reports: the grade of a served model from its success rate
//! and latency over a recent window, the figures behind it, and the
//! thresholds that raise an alert. Shared by the operator (Model status)
//! and the agent (`GET /v1/weir/report`).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Error rate above which a model is in alert.
pub const ALERT_ERROR_RATE: f64 = 0.05;
/// Median latency (milliseconds) above which a model is in alert.
pub const ALERT_LATENCY_MS: f64 = 500.0;

/// A grade, best first.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Grade {
    /// ≥ 99 % success and ≤ 100 ms.
    #[serde(rename = "A+")]
    APlus,
    /// ≥ 95 % success and ≤ 200 ms.
    A,
    /// ≥ 90 % success and ≤ 500 ms.
    B,
    /// ≥ 80 % success.
    C,
    /// The rest.
    D,
}

impl std::fmt::Display for Grade {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Grade::APlus => "A+",
            Grade::A => "A",
            Grade::B => "B",
            Grade::C => "C",
            Grade::D => "D",
        })
    }
}

/// The grade of `success_rate` (0..1) at median latency `latency_ms`
/// (time to first token: what a user waits for).
pub fn grade(success_rate: f64, latency_ms: f64) -> Grade {
    match (success_rate, latency_ms) {
        (s, l) if s >= 0.99 && l <= 100.0 => Grade::APlus,
        (s, l) if s >= 0.95 && l <= 200.0 => Grade::A,
        (s, l) if s >= 0.90 && l <= 500.0 => Grade::B,
        (s, _) if s >= 0.80 => Grade::C,
        _ => Grade::D,
    }
}

/// What a window of requests to one model looked like.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Figures {
    /// Length of the window in seconds.
    pub window_seconds: u64,
    /// Requests finished in it.
    pub requests: u64,
    /// Share of them that succeeded (0..1).
    pub success_rate: f64,
    /// Median end-to-end latency, milliseconds.
    pub p50_latency_ms: f64,
    /// 95th percentile end-to-end latency, milliseconds.
    pub p95_latency_ms: f64,
    /// Median time to first token, milliseconds.
    pub p50_ttft_ms: f64,
}

/// A model's grade, the figures behind it and what to do about them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PerformanceReport {
    /// The grade (from `figures.successRate` and `figures.p50TtftMs`).
    pub grade: Grade,
    /// The figures.
    pub figures: Figures,
    /// Whether the error rate or the latency is past its alert threshold.
    pub alert: bool,
    /// Short advice, most important first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recommendations: Vec<String>,
}

/// What the engine's load looked like beside the figures.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Load {
    /// Requests waiting to be scheduled.
    pub waiting: f64,
    /// KV cache usage (0..1).
    pub kv_usage: f64,
}

impl PerformanceReport {
    /// The report of `figures` with `load` beside them; `None` without
    /// requests in the window.
    pub fn of(figures: Figures, load: Load) -> Option<Self> {
        if figures.requests == 0 {
            return None;
        }
        let error_rate = 1.0 - figures.success_rate;
        let mut advice = Vec::new();
        if error_rate > ALERT_ERROR_RATE {
            advice.push(format!(
                "{:.0} % of requests failed: see the agents' logs and the model's events",
                error_rate * 100.0
            ));
        }
        if figures.p50_ttft_ms > 0.5 * figures.p50_latency_ms && load.waiting > 0.0 {
            advice.push("queue time dominates: raise replicas.max".into());
        }
        if load.kv_usage > 0.9 {
            advice.push(
                "the KV cache is nearly full: raise gpuMemoryUtilization or lower maxNumSeqs"
                    .into(),
            );
        }
        if figures.p50_ttft_ms > ALERT_LATENCY_MS && advice.is_empty() {
            advice.push("first tokens are slow: consider a smaller model or more replicas".into());
        }
        Some(Self {
            grade: grade(figures.success_rate, figures.p50_ttft_ms),
            alert: error_rate > ALERT_ERROR_RATE || figures.p50_ttft_ms > ALERT_LATENCY_MS,
            figures,
            recommendations: advice,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grades_follow_the_table() {
        assert_eq!(grade(0.995, 80.0), Grade::APlus);
        assert_eq!(grade(0.995, 150.0), Grade::A);
        assert_eq!(grade(0.97, 90.0), Grade::A);
        assert_eq!(grade(0.92, 400.0), Grade::B);
        assert_eq!(grade(0.99, 900.0), Grade::C);
        assert_eq!(grade(0.85, 50.0), Grade::C);
        assert_eq!(grade(0.5, 50.0), Grade::D);
        assert_eq!(serde_json::to_value(Grade::APlus).unwrap(), "A+");
    }

    #[test]
    fn alerts_and_advice_follow_the_figures() {
        let good = Figures {
            window_seconds: 300,
            requests: 100,
            success_rate: 1.0,
            p50_latency_ms: 900.0,
            p95_latency_ms: 1500.0,
            p50_ttft_ms: 40.0,
        };
        let report = PerformanceReport::of(good.clone(), Load::default()).unwrap();
        assert_eq!((report.grade, report.alert), (Grade::APlus, false));
        assert!(report.recommendations.is_empty());
        let queued = Figures {
            p50_ttft_ms: 700.0,
            success_rate: 0.9,
            ..good.clone()
        };
        let load = Load {
            waiting: 12.0,
            kv_usage: 0.95,
        };
        let report = PerformanceReport::of(queued, load).unwrap();
        assert!(report.alert);
        assert_eq!(report.grade, Grade::C);
        assert_eq!(
            report.recommendations.len(),
            3,
            "{:?}",
            report.recommendations
        );
        assert!(report.recommendations[1].contains("raise replicas.max"));
        let idle = Figures {
            requests: 0,
            ..good
        };
        assert_eq!(PerformanceReport::of(idle, Load::default()), None);
    }
}
