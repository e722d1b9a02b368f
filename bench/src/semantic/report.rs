//! The benchmark's tables: precision, recall and false-hit rate per
//! configuration, hits by kind, and what verification costs.

use std::collections::BTreeMap;
use std::time::Duration;

/// A labelled pair of questions.
pub struct Pair {
    /// Its id in the file.
    pub id: u64,
    /// `paraphrase`, or the kind of near-miss (`role_swap`, `negation`, …).
    pub kind: String,
    /// Whether one answer serves both.
    pub same: bool,
    /// Asked first (stored).
    pub a: String,
    /// Asked second (hit or miss).
    pub b: String,
    /// `dev` or `holdout`.
    pub split: String,
}

/// What happened to question B.
pub struct PairResult {
    /// Answered by the semantic cache.
    pub hit: bool,
    /// The similarity header, if any.
    pub similarity: Option<f32>,
    /// The veto header, if any.
    pub veto: Option<String>,
    /// Time to the whole answer.
    pub latency: Duration,
}

type Row = (String, String, Vec<PairResult>);

fn ratio(n: usize, d: usize) -> String {
    if d == 0 {
        "-".into()
    } else {
        format!("{:.3}", n as f64 / d as f64)
    }
}

/// Precision, recall and false-hit rate of each configuration.
pub fn table(pairs: &[Pair], rows: &[Row]) {
    println!(
        "{:<22} {:>9} {:>7} {:>10} {:>6} {:>11}",
        "configuration", "precision", "recall", "false-hit", "hits", "false hits"
    );
    for (label, _, results) in rows {
        let (mut tp, mut fp) = (0, 0);
        for (p, r) in pairs.iter().zip(results) {
            match (r.hit, p.same) {
                (true, true) => tp += 1,
                (true, false) => fp += 1,
                _ => {}
            }
        }
        let same = pairs.iter().filter(|p| p.same).count();
        println!(
            "{label:<22} {:>9} {:>7} {:>10} {:>6} {:>11}",
            ratio(tp, tp + fp),
            ratio(tp, same),
            ratio(fp, pairs.len() - same),
            tp + fp,
            fp
        );
    }
}

/// Hits by kind: recall for paraphrases, false hits for each near-miss
/// kind, as `hits/pairs`.
pub fn kinds(pairs: &[Pair], rows: &[Row]) {
    let mut kinds: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, p) in pairs.iter().enumerate() {
        kinds.entry(p.kind.as_str()).or_default().push(i);
    }
    print!("\n{:<14}", "hits by kind");
    for (label, ..) in rows {
        print!(" {label:>14}");
    }
    println!();
    for (kind, members) in &kinds {
        print!("{kind:<14}");
        for (.., results) in rows {
            let hits = members.iter().filter(|&&i| results[i].hit).count();
            print!(" {:>14}", format!("{hits}/{}", members.len()));
        }
        println!();
    }
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// The p99 upper bound of the agent's verification histogram for `model`
/// and `stage`, from the Prometheus text.
fn verify_p99(metrics: &str, model: &str, stage: &str) -> Option<(f64, u64)> {
    let prefix = "weir_semantic_cache_verify_seconds_bucket{";
    let mut buckets: Vec<(f64, u64)> = metrics
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter(|l| {
            l.contains(&format!("model_name=\"{model}\""))
                && l.contains(&format!("reason=\"{stage}\""))
        })
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let count = l.rsplit(' ').next()?.parse().ok()?;
            Some((le, count))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    let want = (total as f64 * 0.99).ceil() as u64;
    buckets
        .iter()
        .find(|(_, c)| *c >= want)
        .map(|(le, _)| (*le, total))
}

/// Latency of question B when it missed, and the verifier's time per
/// candidate (p99 bucket bound of the agent's histogram).
pub fn cost(rows: &[Row], metrics: &str) {
    println!(
        "\n{:<22} {:>12} {:>12} {:>18} {:>18}",
        "configuration", "miss p50", "miss p99", "rules p99 (n)", "model p99 (n)"
    );
    for (label, model, results) in rows {
        let mut misses: Vec<Duration> = results
            .iter()
            .filter(|r| !r.hit)
            .map(|r| r.latency)
            .collect();
        misses.sort();
        let stage = |s: &str| match verify_p99(metrics, model, s) {
            Some((le, n)) => format!("≤{:.3} ms ({n})", le * 1000.0),
            None => "-".into(),
        };
        println!(
            "{label:<22} {:>12.2?} {:>12.2?} {:>18} {:>18}",
            percentile(&misses, 0.5),
            percentile(&misses, 0.99),
            stage("rules"),
            stage("model")
        );
    }
}

/// Every pair's outcome, for looking at what a configuration gets wrong.
pub fn show(pairs: &[Pair], results: &[PairResult]) {
    for (p, r) in pairs.iter().zip(results) {
        let verdict = match (r.hit, p.same) {
            (true, true) => "hit",
            (true, false) => "FALSE HIT",
            (false, true) => "missed",
            (false, false) => "refused",
        };
        println!(
            "{:>4} {:<10} {:<11} {:>6} {:<10} {} | {}",
            p.id,
            p.kind,
            verdict,
            r.similarity.map_or("-".into(), |s| format!("{s:.3}")),
            r.veto.as_deref().unwrap_or(""),
            p.a,
            p.b
        );
    }
}
