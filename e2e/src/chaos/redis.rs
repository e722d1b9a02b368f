//! Redis in trouble under load: the L2 response cache's server is stopped
//! (SIGSTOP: connections hang), resumed, then killed, while requests keep
//! coming. Every request must still be answered, promptly: the cache is an
//! optimisation, never a dependency.

use std::time::{Duration, Instant};

use super::{Row, chat, post, tiny_model};
use crate::process::{Agent, Redis};

/// Longest any request may take (the tiny model answers in milliseconds;
/// the L2 timeout is 100 ms).
const BOUND: Duration = Duration::from_secs(3);

/// Runs the scenario.
pub async fn run(dir: &std::path::Path) -> Row {
    let mut row = Row::new("Redis stopped, then killed");
    let redis = Redis::start();
    let secrets = dir.join("secrets");
    std::fs::create_dir_all(secrets.join("redis")).expect("secrets dir");
    std::fs::write(secrets.join("redis/url"), redis.url()).expect("secret written");
    let config = dir.join("weir.yaml");
    std::fs::write(
        &config,
        format!(
            "kind: CachePolicy\nmetadata: {{name: shared}}\nspec:\n  responseCache:\n    l2:\n      urlSecretRef: {{name: redis, key: url}}\n      timeoutMs: 100\n---\n\
             kind: Model\nmetadata: {{name: m}}\nspec:\n  source: {{uri: 'file://{}'}}\n  servedName: cached\n  cachePolicyRef: {{name: shared}}\n",
            tiny_model(dir)
        ),
    )
    .expect("config written");
    let agent = Agent::start(&[
        "--config",
        config.to_str().expect("UTF-8"),
        "--secrets-dir",
        secrets.to_str().expect("UTF-8"),
    ]);
    let client = reqwest::Client::new();
    let started = Instant::now();
    let span = Duration::from_secs(6);
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let (client, url) = (client.clone(), agent.url.clone());
            tokio::spawn(async move {
                let mut answers = Vec::new();
                let mut i = 0;
                while started.elapsed() < span {
                    // Unique prompts: every request misses L1 and asks L2.
                    let body = chat("cached", &format!("fresh question {w}-{i}"), 4, i % 3 == 0);
                    answers.push(post(&client, &url, &body, Duration::from_secs(30)).await);
                    i += 1;
                }
                answers
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    redis.signal("STOP");
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.signal("CONT");
    tokio::time::sleep(Duration::from_secs(1)).await;
    redis.signal("KILL");
    for w in workers {
        for a in w.await.unwrap_or_default() {
            row.sent += 1;
            row.took(a.total);
            let streamed = a.body.starts_with("data:");
            let whole = a.status == 200 && a.error.is_none() && (!streamed || a.clean_stream());
            if whole && a.total <= BOUND {
                row.served += 1;
            } else if whole {
                row.fail(format!("answered only after {:?}", a.total));
            } else {
                row.fail(format!("status {} error {:?}", a.status, a.error));
            }
        }
    }
    if row.sent < 50 {
        row.problems.push(format!(
            "only {} requests in {span:?}: too few to tell",
            row.sent
        ));
    }
    drop(agent);
    row
}
