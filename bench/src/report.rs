//! Per-request outcomes and the summary table.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;

/// What one request measured.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// HTTP status (0: no answer).
    pub status: u16,
    /// `x-weir-cache` header.
    pub tier: Option<String>,
    /// `x-weir-coalesced` header present.
    pub coalesced: bool,
    /// Time to the first content delta.
    pub ttft: Option<Duration>,
    /// Gaps between content deltas.
    pub gaps: Vec<Duration>,
    /// End to end.
    pub e2e: Duration,
    /// Completion tokens (from the usage chunk).
    pub tokens: u64,
    /// `x-weir-replica` header: the agent whose engine answered.
    pub replica: Option<String>,
    /// The answer's text.
    pub text: String,
}

impl Outcome {
    /// A failed request.
    pub fn failed(status: u16, e2e: Duration) -> Self {
        Self {
            status,
            e2e,
            ..Self::default()
        }
    }
}

/// Percentiles of one latency, in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
}

fn percentiles(values: impl Iterator<Item = Duration>) -> Percentiles {
    let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds");
    for v in values {
        let _ = h.record((v.as_micros() as u64).max(1));
    }
    if h.is_empty() {
        return Percentiles::default();
    }
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Percentiles {
        p50: ms(0.5),
        p90: ms(0.9),
        p99: ms(0.99),
    }
}

/// One scenario's figures.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// Requests sent.
    pub requests: usize,
    /// Requests answered 200.
    pub ok: usize,
    /// Time to first token.
    pub ttft: Percentiles,
    /// Inter-token latency.
    pub itl: Percentiles,
    /// End-to-end latency.
    pub e2e: Percentiles,
    /// Requests per second.
    pub rps: f64,
    /// Output tokens per second.
    pub tokens_per_s: f64,
    /// Share answered from a cache tier.
    pub cache_hits: f64,
    /// Share answered by joining a generation in flight.
    pub coalesced: f64,
    /// Requests answered per replica (`x-weir-replica`).
    pub replicas: BTreeMap<String, usize>,
}

impl Summary {
    /// Summarises `outcomes` measured over `elapsed`.
    pub fn of(outcomes: &[Outcome], elapsed: Duration) -> Self {
        let ok: Vec<&Outcome> = outcomes.iter().filter(|o| o.status == 200).collect();
        let n = outcomes.len().max(1) as f64;
        let secs = elapsed.as_secs_f64().max(1e-9);
        Self {
            requests: outcomes.len(),
            ok: ok.len(),
            ttft: percentiles(ok.iter().filter_map(|o| o.ttft)),
            itl: percentiles(ok.iter().flat_map(|o| o.gaps.iter().copied())),
            e2e: percentiles(ok.iter().map(|o| o.e2e)),
            rps: ok.len() as f64 / secs,
            tokens_per_s: ok.iter().map(|o| o.tokens).sum::<u64>() as f64 / secs,
            cache_hits: ok
                .iter()
                .filter(|o| matches!(o.tier.as_deref(), Some("l1" | "l2" | "semantic")))
                .count() as f64
                / n,
            coalesced: ok.iter().filter(|o| o.coalesced).count() as f64 / n,
            replicas: ok.iter().fold(BTreeMap::new(), |mut m, o| {
                if let Some(r) = &o.replica {
                    *m.entry(r.clone()).or_insert(0) += 1;
                }
                m
            }),
        }
    }

    /// The largest replica's share over the mean share (1.0: even), over
    /// `replicas` replicas (at least those seen).
    pub fn max_over_mean_share(&self, replicas: usize) -> f64 {
        let total: usize = self.replicas.values().sum();
        let n = replicas.max(self.replicas.len()).max(1);
        let most = self.replicas.values().copied().max().unwrap_or(0);
        if total == 0 {
            return 0.0;
        }
        most as f64 / (total as f64 / n as f64)
    }
}

/// Prints the table, with ratios against the first scenario.
#[allow(clippy::print_stdout)] // the table is the load generator's output
pub fn print(results: &[(String, Summary)]) {
    println!(
        "{:<16} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>9} {:>6} {:>6}",
        "scenario",
        "ok/sent",
        "ttft p50",
        "ttft p99",
        "itl p50",
        "e2e p50",
        "e2e p99",
        "req/s",
        "tok/s",
        "hit",
        "coal"
    );
    for (name, s) in results {
        println!(
            "{:<16} {:>9} {:>7.1}ms {:>7.1}ms {:>7.2}ms {:>7.1}ms {:>7.1}ms {:>8.1} {:>9.0} {:>5.0}% {:>5.0}%",
            name,
            format!("{}/{}", s.ok, s.requests),
            s.ttft.p50,
            s.ttft.p99,
            s.itl.p50,
            s.e2e.p50,
            s.e2e.p99,
            s.rps,
            s.tokens_per_s,
            s.cache_hits * 100.0,
            s.coalesced * 100.0
        );
    }
    for (name, s) in results.iter().filter(|(_, s)| !s.replicas.is_empty()) {
        let shares: Vec<String> = s
            .replicas
            .iter()
            .map(|(r, n)| format!("{r} {:.0}%", 100.0 * *n as f64 / s.ok.max(1) as f64))
            .collect();
        println!("{name} replica shares: {}", shares.join(", "));
    }
    if let Some((base_name, base)) = results.first() {
        for (name, s) in results.iter().skip(1) {
            let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
            println!(
                "{name} vs {base_name}: throughput {:.2}x, e2e p50 {:.2}x, ttft p50 {:.2}x",
                ratio(s.rps, base.rps),
                ratio(s.e2e.p50, base.e2e.p50),
                ratio(s.ttft.p50, base.ttft.p50)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_math() {
        let ms = Duration::from_millis;
        let outcomes: Vec<Outcome> = (1..=100)
            .map(|i| Outcome {
                status: 200,
                tier: (i % 4 == 0).then(|| "l1".to_owned()),
                coalesced: i % 10 == 0,
                ttft: Some(ms(i)),
                gaps: vec![ms(2)],
                e2e: ms(i * 2),
                tokens: 10,
                replica: Some(format!("r{}", i % 3 == 0)),
                text: String::new(),
            })
            .chain(std::iter::once(Outcome::failed(429, ms(1))))
            .collect();
        let s = Summary::of(&outcomes, Duration::from_secs(2));
        assert_eq!((s.requests, s.ok), (101, 100));
        assert!(
            (s.ttft.p50 - 50.0).abs() < 1.0 && (s.ttft.p99 - 99.0).abs() < 1.0,
            "{:?}",
            s.ttft
        );
        assert!((s.itl.p50 - 2.0).abs() < 0.01);
        assert!((s.rps - 50.0).abs() < 1e-9 && (s.tokens_per_s - 500.0).abs() < 1e-9);
        assert!(
            (s.cache_hits - 25.0 / 101.0).abs() < 1e-9 && (s.coalesced - 10.0 / 101.0).abs() < 1e-9
        );
        // 33 of 100 on one replica, 67 on the other; over 2 the mean is 50.
        assert_eq!(s.replicas.get("rtrue"), Some(&33));
        assert!((s.max_over_mean_share(2) - 67.0 / 50.0).abs() < 1e-9);
        assert!((s.max_over_mean_share(4) - 67.0 / 25.0).abs() < 1e-9);
    }
}
