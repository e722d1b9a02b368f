//! `weir-loadgen`: load for an OpenAI-compatible endpoint. Sends a mixed
//! prompt set (fresh prompts, exact repeats, paraphrases) at a fixed
//! concurrency, streaming, and reports time to first token, inter-token
//! latency, end-to-end latency (p50/p90/p99), throughput and the share of
//! answers served by each cache tier or by coalescing. With several
//! `--scenario name=URL` it runs the same workload against each and prints
//! ratios against the first, in one run.

#![allow(clippy::print_stdout)] // the report is the program's output

use weir_bench::request::one;
use weir_bench::{report, scenarios, workload};

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::json;

use report::Summary;

/// Command line.
#[derive(Parser, Debug)]
#[command(
    name = "weir-loadgen",
    about = "Load generator for OpenAI-compatible endpoints"
)]
struct Args {
    /// Endpoint base URL (ignored when scenarios are given).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// `name=URL`, repeated: compare the same workload across endpoints.
    #[arg(long = "scenario")]
    scenarios: Vec<String>,
    /// Model name.
    #[arg(long, default_value = "weir-tiny")]
    model: String,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Requests per scenario.
    #[arg(long, default_value_t = 200)]
    requests: usize,
    /// Tokens per answer.
    #[arg(long, default_value_t = 32)]
    max_tokens: u32,
    /// Sampling temperature (0: greedy, cacheable).
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Share of requests that repeat an earlier prompt exactly.
    #[arg(long, default_value_t = 0.3)]
    repeat_share: f64,
    /// Share of requests that paraphrase an earlier prompt.
    #[arg(long, default_value_t = 0.2)]
    paraphrase_share: f64,
    /// One prompt per line instead of the built-in set.
    #[arg(long)]
    prompts: Option<std::path::PathBuf>,
    /// Seed of the prompt mix.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// A routing scenario instead of the prompt mix: `multi-turn`
    /// (conversations growing their history behind one system prompt),
    /// `shared-prompt` (single turns behind one long system prompt) or
    /// `mix`. The URL may list several agents, comma-separated: sessions
    /// enter at each in turn.
    #[arg(long)]
    workload: Option<scenarios::Workload>,
    /// Conversations of `multi-turn` and `mix`.
    #[arg(long, default_value_t = 16)]
    conversations: usize,
    /// Turns per conversation.
    #[arg(long, default_value_t = 4)]
    turns: usize,
    /// Single-turn users of `shared-prompt` and `mix`.
    #[arg(long, default_value_t = 64)]
    users: usize,
    /// Sentences of the shared system prompt.
    #[arg(long, default_value_t = 8)]
    system_sentences: usize,
    /// Words of each user turn in `multi-turn` and `mix`.
    #[arg(long, default_value_t = 24)]
    user_words: usize,
}

async fn run(args: &Args, url: &str, prompts: &[(String, workload::Origin)]) -> Summary {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .build()
        .unwrap_or_default();
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..args.concurrency)
        .map(|_| {
            let (client, next, url) = (client.clone(), next.clone(), url.to_owned());
            let prompts = prompts.to_vec();
            let (model, max_tokens, temperature) =
                (args.model.clone(), args.max_tokens, args.temperature);
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((prompt, _)) = prompts.get(i) else {
                        break;
                    };
                    let body = json!({
                        "model": model, "messages": [{"role": "user", "content": prompt}],
                        "max_tokens": max_tokens, "temperature": temperature, "stream": true,
                        "stream_options": {"include_usage": true},
                    });
                    outcomes.push(one(&client, &url, body).await);
                }
                outcomes
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for w in workers {
        outcomes.extend(w.await.unwrap_or_default());
    }
    Summary::of(&outcomes, started.elapsed())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let own: Vec<String> = match &args.prompts {
        Some(path) => std::fs::read_to_string(path)?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_owned)
            .collect(),
        None => Vec::new(),
    };
    let prompts = workload::mix(
        args.requests,
        args.repeat_share,
        args.paraphrase_share,
        args.seed,
        &own,
    );
    let scenarios: Vec<(String, String)> = if args.scenarios.is_empty() {
        vec![("endpoint".into(), args.url.clone())]
    } else {
        args.scenarios
            .iter()
            .map(|s| s.split_once('=').map(|(n, u)| (n.to_owned(), u.to_owned())))
            .collect::<Option<_>>()
            .ok_or_else(|| anyhow::anyhow!("--scenario takes name=URL"))?
    };
    if let Some(workload) = args.workload {
        let options = scenarios::Options {
            model: args.model.clone(),
            conversations: args.conversations,
            turns: args.turns,
            users: args.users,
            concurrency: args.concurrency,
            max_tokens: args.max_tokens,
            system_sentences: args.system_sentences,
            user_words: args.user_words,
            seed: args.seed,
        };
        println!(
            "weir-loadgen: {workload:?}, {} conversations x {} turns, {} users, concurrency {}, {} tokens\n",
            options.conversations,
            options.turns,
            options.users,
            options.concurrency,
            options.max_tokens
        );
        let mut results = Vec::new();
        for (name, url) in &scenarios {
            let entries: Vec<String> = url.split(',').map(str::to_owned).collect();
            let sessions = scenarios::sessions(workload, &options);
            results.push((
                name.clone(),
                scenarios::run(&entries, &options, sessions).await,
            ));
        }
        report::print(&results);
        return Ok(());
    }
    println!(
        "weir-loadgen: {} requests, concurrency {}, {} tokens, repeats {:.0} %, paraphrases {:.0} %\n",
        args.requests,
        args.concurrency,
        args.max_tokens,
        args.repeat_share * 100.0,
        args.paraphrase_share * 100.0
    );
    let mut results = Vec::new();
    for (name, url) in &scenarios {
        // Warm up connections and the model without touching the measured set.
        let warm = json!({"model": args.model, "messages": [{"role": "user", "content": "warm up"}], "max_tokens": 1});
        let _ = reqwest::Client::new()
            .post(format!("{url}/v1/chat/completions"))
            .json(&warm)
            .send()
            .await;
        results.push((name.clone(), run(&args, url, &prompts).await));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    report::print(&results);
    Ok(())
}
