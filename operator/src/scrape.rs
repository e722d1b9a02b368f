//! Collected metrics: the operator reads each agent's `/metrics` on an
//! interval (no Prometheus server needed) and keeps, per model, the figures
//! autoscaling and ensemble reweighting need. Only the few series Weir
//! agents export are parsed; other lines are ignored.

use std::collections::BTreeMap;
use std::time::Duration;

/// One histogram: cumulative bucket counts by upper bound, plus sum/count.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Histogram {
    /// `(le, cumulative count)`, ascending by `le` (`+Inf` last).
    pub buckets: Vec<(f64, f64)>,
    /// Sum of observations.
    pub sum: f64,
    /// Number of observations.
    pub count: f64,
}

impl Histogram {
    /// Adds another agent's histogram of the same series.
    pub fn add(&mut self, other: &Histogram) {
        for &(le, c) in &other.buckets {
            match self.buckets.iter_mut().find(|(l, _)| *l == le) {
                Some(b) => b.1 += c,
                None => self.buckets.push((le, c)),
            }
        }
        self.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        self.sum += other.sum;
        self.count += other.count;
    }

    /// Observations since `earlier` (counters only grow; a reset counts from zero).
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        if self.count < earlier.count {
            return self.clone();
        }
        let buckets = self
            .buckets
            .iter()
            .map(|&(le, c)| {
                let before = earlier
                    .buckets
                    .iter()
                    .find(|(l, _)| *l == le)
                    .map_or(0.0, |b| b.1);
                (le, (c - before).max(0.0))
            })
            .collect();
        Histogram {
            buckets,
            sum: self.sum - earlier.sum,
            count: self.count - earlier.count,
        }
    }

    /// The `q` quantile (0..1) by linear interpolation inside the bucket,
    /// as Prometheus' `histogram_quantile` does; `None` without observations.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count <= 0.0 {
            return None;
        }
        let rank = q * self.count;
        let mut lower = (0.0, 0.0);
        for &(le, cumulative) in &self.buckets {
            if cumulative >= rank {
                if le.is_infinite() {
                    return Some(lower.0);
                }
                let in_bucket = cumulative - lower.1;
                let frac = if in_bucket > 0.0 {
                    (rank - lower.1) / in_bucket
                } else {
                    1.0
                };
                return Some(lower.0 + (le - lower.0) * frac);
            }
            lower = (le, cumulative);
        }
        Some(lower.0)
    }
}

/// What one agent reports about one model.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelFigures {
    /// `vllm:num_requests_waiting`.
    pub waiting: f64,
    /// `vllm:num_requests_running`.
    pub running: f64,
    /// `vllm:kv_cache_usage_perc` (0..1).
    pub kv_usage: f64,
    /// `weir_requests_held`: requests an agent holds until a replica of
    /// the model is ready (what scales a Model from zero).
    pub held: f64,
    /// Finished requests that succeeded (`weir_requests_total{outcome="success"}`).
    pub successes: f64,
    /// Finished requests that failed (other outcomes).
    pub failures: f64,
    /// `vllm:e2e_request_latency_seconds`.
    pub e2e: Histogram,
    /// `vllm:time_to_first_token_seconds`.
    pub ttft: Histogram,
}

impl ModelFigures {
    /// What happened since `earlier` (gauges as now; counters and
    /// histograms as differences, from zero where one was reset).
    pub fn since(&self, earlier: &ModelFigures) -> ModelFigures {
        let reset = self.successes < earlier.successes || self.failures < earlier.failures;
        let (successes, failures) = if reset {
            (self.successes, self.failures)
        } else {
            (
                self.successes - earlier.successes,
                self.failures - earlier.failures,
            )
        };
        ModelFigures {
            successes,
            failures,
            e2e: self.e2e.since(&earlier.e2e),
            ttft: self.ttft.since(&earlier.ttft),
            ..self.clone()
        }
    }
}

/// Splits `name{a="b",c="d"} value` into its parts.
fn parse_line(line: &str) -> Option<(&str, BTreeMap<&str, &str>, f64)> {
    let (series, value) = line.rsplit_once(' ')?;
    let value: f64 = match value {
        "+Inf" => f64::INFINITY,
        v => v.parse().ok()?,
    };
    let (name, labels) = match series.split_once('{') {
        Some((name, rest)) => (name, rest.strip_suffix('}')?),
        None => (series, ""),
    };
    let mut map = BTreeMap::new();
    for pair in labels.split("\",").filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once("=\"")?;
        map.insert(k.trim_start_matches(','), v.trim_end_matches('"'));
    }
    Some((name, map, value))
}

/// Per-model figures from a Prometheus text exposition.
pub fn parse(text: &str) -> BTreeMap<String, ModelFigures> {
    let mut out: BTreeMap<String, ModelFigures> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let Some((name, labels, value)) = parse_line(line) else {
            continue;
        };
        let Some(model) = labels.get("model_name") else {
            continue;
        };
        let f = out.entry((*model).to_owned()).or_default();
        let hist = |h: &mut Histogram| match name.rsplit_once('_').map(|x| x.1) {
            Some("sum") => h.sum = value,
            Some("count") => h.count = value,
            Some("bucket") => {
                let le = labels.get("le").and_then(|l| {
                    if *l == "+Inf" {
                        Some(f64::INFINITY)
                    } else {
                        l.parse().ok()
                    }
                });
                if let Some(le) = le {
                    h.buckets.push((le, value));
                    h.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
                }
            }
            _ => {}
        };
        match name {
            "vllm:num_requests_waiting" => f.waiting = value,
            "vllm:num_requests_running" => f.running = value,
            "vllm:kv_cache_usage_perc" => f.kv_usage = value,
            "weir_requests_held" => f.held = value,
            "weir_requests_total" if labels.get("outcome") == Some(&"success") => {
                f.successes += value
            }
            "weir_requests_total" => f.failures += value,
            n if n.starts_with("vllm:e2e_request_latency_seconds_") => hist(&mut f.e2e),
            n if n.starts_with("vllm:time_to_first_token_seconds_") => hist(&mut f.ttft),
            _ => {}
        }
    }
    out
}

/// Errors reading an agent's metrics.
#[derive(Debug, thiserror::Error)]
#[error("scraping {endpoint}: {message}")]
pub struct ScrapeError {
    /// The agent.
    pub endpoint: String,
    /// What failed.
    pub message: String,
}

/// Reads and parses `endpoint/metrics` within `timeout`.
pub async fn scrape(
    client: &reqwest::Client,
    endpoint: &str,
    timeout: Duration,
) -> Result<BTreeMap<String, ModelFigures>, ScrapeError> {
    let err = |message: String| ScrapeError {
        endpoint: endpoint.to_owned(),
        message,
    };
    let response = client
        .get(format!("{endpoint}/metrics"))
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| err(e.to_string()))?;
    if !response.status().is_success() {
        return Err(err(format!("status {}", response.status())));
    }
    let text = response.text().await.map_err(|e| err(e.to_string()))?;
    Ok(parse(&text))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP vllm:num_requests_waiting Requests waiting
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="llama"} 7.0
vllm:num_requests_running{model_name="llama"} 3.0
vllm:kv_cache_usage_perc{model_name="llama"} 0.42
weir_requests_total{model_name="llama",outcome="success"} 90
weir_requests_total{model_name="llama",outcome="internal_error"} 10
vllm:e2e_request_latency_seconds_sum{model_name="llama"} 30.0
vllm:e2e_request_latency_seconds_count{model_name="llama"} 100
vllm:e2e_request_latency_seconds_bucket{le="0.1",model_name="llama"} 10
vllm:e2e_request_latency_seconds_bucket{le="0.5",model_name="llama"} 60
vllm:e2e_request_latency_seconds_bucket{le="1.0",model_name="llama"} 100
vllm:e2e_request_latency_seconds_bucket{le="+Inf",model_name="llama"} 100
vllm:num_requests_waiting{model_name="qwen"} 0
weir_requests_held{model_name="sleepy"} 4
# EOF
"#;

    #[test]
    fn parses_the_series_weir_agents_export() {
        let m = parse(TEXT);
        let llama = &m["llama"];
        assert_eq!(
            (llama.waiting, llama.running, llama.kv_usage),
            (7.0, 3.0, 0.42)
        );
        assert_eq!((llama.successes, llama.failures), (90.0, 10.0));
        assert_eq!(llama.e2e.count, 100.0);
        assert_eq!(llama.e2e.buckets.len(), 4);
        assert_eq!(m["qwen"].waiting, 0.0);
        assert_eq!((m["sleepy"].held, m["llama"].held), (4.0, 0.0));
    }

    #[test]
    fn quantiles_interpolate_within_buckets_and_deltas_subtract() {
        let h = parse(TEXT)["llama"].e2e.clone();
        // Rank 50 lies in (0.1, 0.5]: 10 below, 50 inside → 0.1 + 0.4 × 40/50.
        let p50 = h.quantile(0.5).unwrap();
        assert!((p50 - 0.42).abs() < 1e-9, "{p50}");
        let earlier = Histogram {
            buckets: vec![(0.1, 10.0), (0.5, 10.0), (1.0, 10.0), (f64::INFINITY, 10.0)],
            sum: 1.0,
            count: 10.0,
        };
        let recent = h.since(&earlier);
        assert_eq!(recent.count, 90.0);
        assert!((recent.quantile(0.5).unwrap() - (0.1 + 0.4 * 45.0 / 50.0)).abs() < 1e-9);
        assert_eq!(Histogram::default().quantile(0.5), None);
    }
}
