//! Overload: ten times more clients than the engine runs at once, each
//! asking again as soon as it is answered. The agent must shed with 429 and
//! `Retry-After` rather than queue a request past its queue timeout.

use std::time::{Duration, Instant};

use super::{Row, chat, post, tiny_model};
use crate::process::Agent;

/// Sequences the engine runs at once.
const SEQS: usize = 2;
/// The queue timeout, seconds.
const QUEUE_TIMEOUT: u64 = 2;

/// Runs the scenario.
pub async fn run(dir: &std::path::Path) -> Row {
    let mut row = Row::new("overload at 10x capacity");
    let config = dir.join("overload.yaml");
    std::fs::write(
        &config,
        format!(
            "kind: BatchPolicy\nmetadata: {{name: small}}\nspec:\n  maxNumSeqs: {SEQS}\n  queue: {{timeoutSeconds: {QUEUE_TIMEOUT}}}\n---\n\
             kind: CachePolicy\nmetadata: {{name: off}}\nspec:\n  responseCache: {{enabled: false}}\n  coalescing: {{enabled: false}}\n---\n\
             kind: Model\nmetadata: {{name: m}}\nspec:\n  source: {{uri: 'file://{}'}}\n  servedName: busy\n  batchPolicyRef: {{name: small}}\n  cachePolicyRef: {{name: off}}\n",
            tiny_model(dir)
        ),
    )
    .expect("config written");
    let agent = Agent::start(&["--config", config.to_str().expect("UTF-8")]);
    let client = reqwest::Client::new();
    let started = Instant::now();
    let span = Duration::from_secs(8);
    let workers: Vec<_> = (0..SEQS * 10)
        .map(|w| {
            let (client, url) = (client.clone(), agent.url.clone());
            tokio::spawn(async move {
                let mut answers = Vec::new();
                let mut i = 0;
                while started.elapsed() < span {
                    let mut body = chat("busy", &format!("busy {w}-{i}"), 48, false);
                    body["ignore_eos"] = true.into();
                    answers.push(post(&client, &url, &body, Duration::from_secs(60)).await);
                    i += 1;
                }
                answers
            })
        })
        .collect();
    // Admitted requests wait at most the queue timeout, then generate.
    let mut slowest_generation = Duration::ZERO;
    let mut answers = Vec::new();
    for w in workers {
        answers.extend(w.await.unwrap_or_default());
    }
    for a in answers.iter().filter(|a| a.status == 200) {
        slowest_generation = slowest_generation.max(a.total);
    }
    for a in &answers {
        row.sent += 1;
        row.took(a.total);
        match a.status {
            200 => row.served += 1,
            429 if a.retry_after.is_some() && a.head <= Duration::from_secs(QUEUE_TIMEOUT + 1) => {
                row.refused += 1
            }
            429 if a.retry_after.is_none() => row.fail("429 without Retry-After"),
            429 => row.fail(format!("shed only after {:?}", a.head)),
            s => row.fail(format!("status {s} error {:?}", a.error)),
        }
    }
    let bound = Duration::from_secs(QUEUE_TIMEOUT) + Duration::from_secs(4);
    if slowest_generation > bound {
        row.problems.push(format!("a served request took {slowest_generation:?}: it queued past the {QUEUE_TIMEOUT} s queue timeout"));
    }
    if row.refused == 0 {
        row.problems.push("nothing was shed at 10x capacity".into());
    }
    drop(agent);
    row
}
