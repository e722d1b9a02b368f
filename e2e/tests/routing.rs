//! Several agents as real processes in standalone mode with static peer
//! lists (what CI runs without a cluster): any agent answers for models its
//! peers hold, by forwarding with streaming passed through; a shared prompt
//! prefix keeps landing on the same replica; a dead replica is retried on
//! another; unknown models and forwarding loops end in 404.

use serde_json::{Value, json};
use weir_e2e::process::Agent;
use weir_engine::testmodel::{TinyModelSpec, write_tiny_model};

fn chat(model: &str, content: &str, stream: bool) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": content}],
           "max_tokens": 6, "temperature": 0, "stream": stream})
}

async fn post(url: &str, body: &Value) -> (u16, String) {
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

async fn metric(url: &str, name: &str) -> f64 {
    let text = reqwest::get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn wait_for_models(url: &str, wanted: &[&str]) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let models: Value = reqwest::get(format!("{url}/v1/models"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let ids: Vec<&str> = models["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|m| m["id"].as_str())
            .collect();
        if wanted.iter().all(|w| ids.contains(w)) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{url} never listed {wanted:?}: {ids:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_forward_to_peers_with_affinity_and_failover() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    write_tiny_model(&model, &TinyModelSpec::llama()).unwrap();
    let model = model.to_str().unwrap();
    let a = Agent::start(&["--model", model, "--served-name", "alpha"]);
    let mut b1 = Agent::start(&["--model", model, "--served-name", "beta"]);
    let mut b2 = Agent::start(&["--model", model, "--served-name", "beta"]);
    let front = Agent::start(&[
        "--model",
        model,
        "--served-name",
        "gamma",
        "--peer",
        &a.url,
        "--peer",
        &b1.url,
        "--peer",
        &b2.url,
    ]);
    wait_for_models(&front.url, &["alpha", "beta", "gamma"]).await;

    // Forwarded answers equal direct ones (greedy).
    let direct = post(&a.url, &chat("alpha", "route me", false)).await;
    let via = post(&front.url, &chat("alpha", "route me", false)).await;
    assert_eq!(direct.0, 200);
    let text = |body: &str| {
        serde_json::from_str::<Value>(body).unwrap()["choices"][0]["message"]["content"].clone()
    };
    assert_eq!(text(&via.1), text(&direct.1));

    // Streaming passes through.
    let (status, body) = post(&front.url, &chat("beta", "stream me", true)).await;
    assert_eq!(status, 200);
    assert!(
        body.contains("chat.completion.chunk") && body.trim_end().ends_with("data: [DONE]"),
        "{body}"
    );

    // The same prefix keeps landing on one replica.
    let before = (
        metric(&b1.url, "weir_requests_total").await,
        metric(&b2.url, "weir_requests_total").await,
    );
    for _ in 0..6 {
        assert_eq!(
            post(
                &front.url,
                &chat("beta", "a long shared system prompt", false)
            )
            .await
            .0,
            200
        );
    }
    let after = (
        metric(&b1.url, "weir_requests_total").await,
        metric(&b2.url, "weir_requests_total").await,
    );
    let (d1, d2) = (after.0 - before.0, after.1 - before.1);
    assert!(
        (d1, d2) == (6.0, 0.0) || (d1, d2) == (0.0, 6.0),
        "split {d1}/{d2}"
    );

    // Kill the favourite: the next request fails over to the other replica.
    if d1 > 0.0 {
        b1.kill()
    } else {
        b2.kill()
    }
    let (status, body) = post(
        &front.url,
        &chat("beta", "a long shared system prompt", false),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    // Unknown models and loops end in 404.
    assert_eq!(post(&front.url, &chat("nope", "x", false)).await.0, 404);
    let looped = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", a.url))
        .header("x-weir-forwarded", "1")
        .json(&chat("beta", "x", false))
        .send()
        .await
        .unwrap();
    assert_eq!(looped.status().as_u16(), 404);
}
