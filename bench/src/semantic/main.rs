//! `weir-semantic-bench`: precision and recall of the semantic cache on a
//! set of labelled question pairs, through a running agent's real request
//! path. For every configuration (a served model name whose CachePolicy
//! sets the threshold and the verifier) and every pair, it asks question A
//! in a fresh scope (a system message naming the pair and the run), then
//! question B in the same scope, and reads `x-weir-cache`: `semantic` is a
//! hit. A hit on a pair labelled the same is right; on a near-miss, a false
//! hit. Prints precision, recall and false-hit rate overall and by kind,
//! the latency of B's misses, and the verifier's time per candidate from
//! the agent's metrics.

#![allow(clippy::print_stdout)] // the report is the program's output

mod report;

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use futures::StreamExt;
use serde_json::{Value, json};

use report::{Pair, PairResult};

/// Command line.
#[derive(Parser, Debug)]
#[command(
    name = "weir-semantic-bench",
    about = "Semantic-cache precision and recall on labelled question pairs"
)]
struct Args {
    /// Agent base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// `label=model`, repeated: a served model per configuration.
    #[arg(long = "config", required = true)]
    configs: Vec<String>,
    /// The labelled pairs (JSON lines: id, kind, same, a, b, split).
    #[arg(long, default_value = "bench/data/semantic-pairs.jsonl")]
    pairs: std::path::PathBuf,
    /// Which pairs: `all`, `dev` or `holdout`.
    #[arg(long, default_value = "all")]
    split: String,
    /// Pairs in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Print every pair's outcome for this configuration.
    #[arg(long)]
    show: Option<String>,
    /// Run only the configurations whose label contains this.
    #[arg(long)]
    only: Option<String>,
}

fn load_pairs(path: &std::path::Path, split: &str) -> anyhow::Result<Vec<Pair>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut pairs = Vec::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: Value = serde_json::from_str(line).with_context(|| format!("line {}", n + 1))?;
        let field = |k: &str| v[k].as_str().map(str::to_owned);
        let pair = Pair {
            id: v["id"].as_u64().unwrap_or(n as u64),
            kind: field("kind").context("kind")?,
            same: v["same"].as_bool().context("same")?,
            a: field("a").context("a")?,
            b: field("b").context("b")?,
            split: field("split").unwrap_or_else(|| "dev".into()),
        };
        if split == "all" || pair.split == split {
            pairs.push(pair);
        }
    }
    if pairs.is_empty() {
        bail!("no pairs in {} for split {split}", path.display());
    }
    Ok(pairs)
}

/// One question in the pair's own scope; the `x-weir-cache` value, the
/// similarity and veto headers, and the time to the whole answer.
async fn ask(
    client: &reqwest::Client,
    url: &str,
    model: &str,
    scope: &str,
    question: &str,
) -> anyhow::Result<(String, Option<f32>, Option<String>, Duration)> {
    let body = json!({
        "model": model,
        "messages": [
            {"role": "system", "content": scope},
            {"role": "user", "content": question},
        ],
        "max_tokens": 1,
        "temperature": 0,
    });
    let started = Instant::now();
    let r = client
        .post(format!("{url}/v1/chat/completions"))
        .json(&body)
        .send()
        .await?;
    let status = r.status();
    let header = |name: &str| {
        r.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let cache = header("x-weir-cache").unwrap_or_default();
    let similarity = header("x-weir-semantic-similarity").and_then(|s| s.parse().ok());
    let veto = header("x-weir-semantic-veto");
    let text = r.text().await?;
    if !status.is_success() {
        bail!("{status}: {text}");
    }
    Ok((cache, similarity, veto, started.elapsed()))
}

async fn run_pair(
    client: &reqwest::Client,
    url: &str,
    model: &str,
    nonce: u128,
    pair: &Pair,
) -> anyhow::Result<PairResult> {
    let scope = format!("semantic benchmark: pair {} run {nonce}", pair.id);
    let (first, ..) = ask(client, url, model, &scope, &pair.a).await?;
    if first == "semantic" {
        bail!("pair {}: the first question hit in a fresh scope", pair.id);
    }
    let (cache, similarity, veto, latency) = ask(client, url, model, &scope, &pair.b).await?;
    Ok(PairResult {
        hit: cache == "semantic",
        similarity,
        veto,
        latency,
    })
}

async fn run_config(
    args: &Args,
    client: &reqwest::Client,
    model: &str,
    pairs: &[Pair],
) -> anyhow::Result<Vec<PairResult>> {
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let results: Vec<anyhow::Result<PairResult>> = futures::stream::iter(pairs)
        .map(|pair| run_pair(client, &args.url, model, nonce, pair))
        .buffered(args.concurrency.max(1))
        .collect()
        .await;
    results.into_iter().collect()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let pairs = load_pairs(&args.pairs, &args.split)?;
    let client = reqwest::Client::new();
    let metrics_url = format!("{}/metrics", args.url);
    let mut rows = Vec::new();
    for config in &args.configs {
        let (label, model) = config.split_once('=').unwrap_or((config, config));
        if args
            .only
            .as_ref()
            .is_some_and(|o| !label.contains(o.as_str()))
        {
            continue;
        }
        let results = run_config(&args, &client, model, &pairs)
            .await
            .with_context(|| format!("configuration {label}"))?;
        if args.show.as_deref() == Some(label) {
            report::show(&pairs, &results);
        }
        rows.push((label.to_owned(), model.to_owned(), results));
    }
    let metrics = client.get(&metrics_url).send().await?.text().await?;
    println!(
        "\n{} pairs ({} paraphrases), split {}\n",
        pairs.len(),
        pairs.iter().filter(|p| p.same).count(),
        args.split
    );
    report::table(&pairs, &rows);
    report::kinds(&pairs, &rows);
    report::cost(&rows, &metrics);
    Ok(())
}
