//! Holding requests while a model has no ready replica, with agents as
//! real processes in standalone mode: a front agent knows model `sleepy`
//! from its peer; the peer stops, and requests for `sleepy` are held by
//! the front (counted in `weir_requests_held`) until the peer is back,
//! then answered, streaming ones too; a client that goes away leaves the
//! queue at once; more requests than the bound get 503 at once, and one
//! held past the hold timeout gets 503, both with `Retry-After` and
//! OpenAI's error shape.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use weir_e2e::process::{Agent, free_port};
use weir_engine::testmodel::{TinyModelSpec, write_tiny_model};

fn chat(content: &str, stream: bool) -> Value {
    json!({"model": "sleepy", "messages": [{"role": "user", "content": content}],
           "max_tokens": 4, "temperature": 0, "stream": stream})
}

/// Status, `Retry-After`, body, and seconds until the head came.
async fn post(url: &str, body: &Value) -> (u16, Option<String>, String, f64) {
    let started = Instant::now();
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .json(body)
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .unwrap();
    let head = started.elapsed().as_secs_f64();
    let retry = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (r.status().as_u16(), retry, r.text().await.unwrap(), head)
}

async fn held(url: &str) -> f64 {
    let text = reqwest::get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("weir_requests_held{model_name=\"sleepy\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Waits up to 30 s until `probe` holds.
async fn until(what: &str, mut probe: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !probe().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn lists_sleepy(url: &str) -> bool {
    let models: Value = reqwest::get(format!("{url}/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    models["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["id"] == "sleepy")
}

fn refused_shape(body: &str) {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(v["error"]["code"], "model_unavailable", "{body}");
    assert_eq!(v["error"]["type"], "service_unavailable_error", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_wait_for_a_replica_within_their_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    write_tiny_model(&model, &TinyModelSpec::llama()).unwrap();
    let model = model.to_str().unwrap();
    let serve = ["--model", model, "--served-name", "sleepy"];
    let port = free_port();
    let mut replica = Agent::start_on(port, &serve);
    let front = Agent::start(&[
        "--peer",
        &replica.url,
        "--hold-timeout=60",
        "--max-held-requests=2",
    ]);
    let strict = Agent::start(&[
        "--peer",
        &replica.url,
        "--hold-timeout=1",
        "--max-held-requests=1",
    ]);
    until("both agents to see `sleepy`", async || {
        lists_sleepy(&front.url).await && lists_sleepy(&strict.url).await
    })
    .await;
    replica.kill();
    until("both agents to see the replica gone", async || {
        !lists_sleepy(&front.url).await && !lists_sleepy(&strict.url).await
    })
    .await;

    // A client that goes away while held leaves the queue at once.
    let gone = tokio::spawn({
        let url = front.url.clone();
        async move { post(&url, &chat("never mind", false)).await }
    });
    until("the first request to be held", async || {
        held(&front.url).await == 1.0
    })
    .await;
    gone.abort();
    until("the abandoned request to leave the queue", async || {
        held(&front.url).await == 0.0
    })
    .await;

    // Two held (one streaming); a third is refused at once.
    let waiting: Vec<_> = [false, true]
        .into_iter()
        .map(|stream| {
            let url = front.url.clone();
            tokio::spawn(async move { post(&url, &chat("wake up", stream)).await })
        })
        .collect();
    until("two requests to be held", async || {
        held(&front.url).await == 2.0
    })
    .await;
    let (status, retry, body, secs) = post(&front.url, &chat("one too many", false)).await;
    assert_eq!(status, 503, "{body}");
    assert!(retry.is_some(), "no Retry-After");
    assert!(secs < 1.0, "the bound refuses at once, took {secs:.2} s");
    refused_shape(&body);

    // Held past the hold timeout: 503 with Retry-After.
    let (status, retry, body, secs) = post(&strict.url, &chat("too late", false)).await;
    assert_eq!(status, 503, "{body}");
    assert!(retry.is_some(), "no Retry-After");
    assert!((1.0..5.0).contains(&secs), "refused after {secs:.2} s");
    refused_shape(&body);

    // The replica comes back: the held requests are answered.
    let back = Instant::now();
    let _replica = Agent::start_on(port, &serve);
    for (i, w) in waiting.into_iter().enumerate() {
        let (status, _, body, secs) = w.await.unwrap();
        assert_eq!(status, 200, "{body}");
        if i == 1 {
            assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
        } else {
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["object"], "chat.completion", "{body}");
        }
        eprintln!(
            "held request {i} answered after {secs:.2} s ({:.2} s after the replica started)",
            back.elapsed().as_secs_f64()
        );
    }
    assert_eq!(held(&front.url).await, 0.0);
}
