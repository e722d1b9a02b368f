//! Stopping an agent under load, as real processes over HTTP: on SIGTERM
//! it reports itself not ready, passes new requests to a peer that serves
//! the model (or refuses them as retryable without one), lets the streams
//! in flight finish, and exits; streams still running at the drain timeout
//! end with an OpenAI error event, never a cut connection.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use weir_e2e::process::Agent;
use weir_engine::testmodel::{TinyModelSpec, write_tiny_model};

/// Streams that outlast a SIGTERM: long answers, many at once.
const STREAMS: usize = 12;
const TOKENS: u32 = 800;

fn long_stream(model: &str, i: usize) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": format!("story {i}")}],
           "max_tokens": TOKENS, "ignore_eos": true, "temperature": 0, "stream": true})
}

/// How one stream ended.
struct Ended {
    body: String,
    at: Instant,
}

/// Starts `STREAMS` streams on `url` and returns once each has sent its
/// first chunk; the handles give each stream's whole body and end time.
async fn start_streams(url: &str, model: &str) -> Vec<tokio::task::JoinHandle<Ended>> {
    let client = reqwest::Client::new();
    let (first_tx, mut first_rx) = tokio::sync::mpsc::channel(STREAMS);
    let handles = (0..STREAMS)
        .map(|i| {
            let (client, url, body, first) = (
                client.clone(),
                url.to_owned(),
                long_stream(model, i),
                first_tx.clone(),
            );
            tokio::spawn(async move {
                let mut response = client
                    .post(format!("{url}/v1/chat/completions"))
                    .json(&body)
                    .send()
                    .await
                    .expect("the stream starts");
                assert_eq!(response.status().as_u16(), 200);
                let mut text = String::new();
                let mut told = false;
                while let Some(chunk) = response.chunk().await.expect("no cut connection") {
                    text.push_str(&String::from_utf8_lossy(&chunk));
                    if !told && text.contains("chat.completion.chunk") {
                        told = true;
                        let _ = first.send(()).await;
                    }
                }
                Ended {
                    body: text,
                    at: Instant::now(),
                }
            })
        })
        .collect();
    for _ in 0..STREAMS {
        tokio::time::timeout(Duration::from_secs(60), first_rx.recv())
            .await
            .expect("every stream sends a first chunk");
    }
    handles
}

/// Polls `/ready` until it answers 503; when it did.
async fn until_not_ready(url: &str) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = reqwest::get(format!("{url}/ready"))
            .await
            .map(|r| r.status().as_u16());
        if status.as_ref().is_ok_and(|s| *s == 503) {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "/ready never went 503: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn ask(url: &str, model: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .json(
            &json!({"model": model, "messages": [{"role": "user", "content": "hi"}],
                      "max_tokens": 4, "temperature": 0}),
        )
        .send()
        .await
        .expect("the agent still accepts connections while draining")
}

async fn requests_total(url: &str) -> f64 {
    let text = reqwest::get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with("weir_requests_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_streams_and_passes_new_requests_to_a_peer() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    write_tiny_model(&model, &TinyModelSpec::small()).unwrap();
    let model = model.to_str().unwrap();
    let peer = Agent::start(&["--model", model, "--served-name", "beta"]);
    let mut agent = Agent::start(&[
        "--model",
        model,
        "--served-name",
        "beta",
        "--peer",
        &peer.url,
        "--drain-timeout",
        "120",
    ]);
    // The static peer list is polled every 2 s: let the agent learn that
    // its peer serves `beta` too.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let streams = start_streams(&agent.url, "beta").await;

    agent.terminate();
    let not_ready = until_not_ready(&agent.url).await;
    let before = requests_total(&peer.url).await;
    let response = ask(&agent.url, "beta").await;
    assert_eq!(response.status().as_u16(), 200, "passed to the peer");
    assert_eq!(requests_total(&peer.url).await, before + 1.0);

    let mut after_not_ready = 0;
    for stream in streams {
        let ended = stream.await.unwrap();
        assert!(
            ended.body.trim_end().ends_with("data: [DONE]") && !ended.body.contains("\"error\""),
            "a stream in flight must finish: {}",
            &ended.body[ended.body.len().saturating_sub(300)..]
        );
        after_not_ready += usize::from(ended.at > not_ready);
    }
    assert!(
        after_not_ready > 0,
        "no stream was still running when the drain began: the test proves nothing"
    );
    let status = agent
        .wait_exit(Duration::from_secs(30))
        .expect("the agent exits once drained");
    assert!(status.success(), "exit status {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_past_the_drain_timeout_end_with_an_error_event() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    write_tiny_model(&model, &TinyModelSpec::small()).unwrap();
    let model = model.to_str().unwrap();
    let mut agent = Agent::start(&["--model", model, "--drain-timeout", "1"]);
    let name = "tiny";
    let streams = start_streams(&agent.url, name).await;
    let stopped = Instant::now();
    agent.terminate();
    until_not_ready(&agent.url).await;

    // No peer serves it: a new request is refused as retryable.
    let refused = ask(&agent.url, name).await;
    assert_eq!(refused.status().as_u16(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    let body: Value = refused.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("out of service"),
        "{body}"
    );

    let mut cut_short = 0;
    for stream in streams {
        let ended = stream.await.unwrap();
        let body = ended.body.trim_end();
        assert!(body.ends_with("data: [DONE]"), "every stream ends properly");
        if body.contains("\"error\"") {
            assert!(body.contains("out of service"), "{body}");
            cut_short += 1;
        }
    }
    assert!(
        cut_short > 0,
        "no stream outlasted the 1 s drain: the test proves nothing"
    );
    let status = agent
        .wait_exit(Duration::from_secs(30))
        .expect("the agent exits after the drain timeout");
    assert!(status.success(), "exit status {status}");
    assert!(stopped.elapsed() < Duration::from_secs(15));
}
