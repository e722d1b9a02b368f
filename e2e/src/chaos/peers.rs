//! Broken peers: a replica killed while it streams answers that another
//! agent forwards, and a replica stopped (SIGSTOP: it accepts connections
//! but never answers) while requests are forwarded to it.

use std::time::Duration;

use super::{Row, chat, post, tiny_model, wait_for_models};
use crate::process::Agent;

/// Longest a forwarded request may take because one replica hangs: the
/// stream head timeout.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Streams through a front agent from a replica that is killed once every
/// stream has begun: each client stream must end with an OpenAI error
/// event and `[DONE]`.
pub async fn killed_mid_stream(dir: &std::path::Path) -> Row {
    let mut row = Row::new("peer killed mid-stream");
    let model = tiny_model(dir);
    let back = Agent::start(&["--model", &model, "--served-name", "beta"]);
    let front = Agent::start(&[
        "--model",
        &model,
        "--served-name",
        "front",
        "--peer",
        &back.url,
    ]);
    if let Err(e) = wait_for_models(&front.url, &["beta"]).await {
        row.problems.push(e);
        return row;
    }
    let client = reqwest::Client::new();
    let (started_tx, mut started_rx) = tokio::sync::mpsc::channel::<()>(16);
    let streams: Vec<_> = (0..8)
        .map(|i| {
            let (client, url, started) = (client.clone(), front.url.clone(), started_tx.clone());
            tokio::spawn(async move {
                let mut body = chat("beta", &format!("tell a long story {i}"), 1500, true);
                body["ignore_eos"] = true.into();
                body["temperature"] = 0.8.into();
                read_stream_signalling(&client, &url, &body, started).await
            })
        })
        .collect();
    for _ in 0..8 {
        if tokio::time::timeout(Duration::from_secs(20), started_rx.recv())
            .await
            .is_err()
        {
            row.problems.push("not every stream began".into());
            break;
        }
    }
    let mut back = back;
    back.kill();
    for s in streams {
        row.sent += 1;
        match s.await {
            Ok((status, body, took)) => {
                row.took(took);
                let answer = super::Answer {
                    status,
                    retry_after: None,
                    body,
                    head: took,
                    total: took,
                    error: None,
                };
                if status == 200 && answer.stream_ended_with_error() {
                    row.refused += 1;
                } else if status == 200 && answer.clean_stream() {
                    row.fail("a stream finished before the kill (make it longer)");
                } else {
                    row.fail(format!(
                        "status {status}, stream ended: {:?}",
                        tail(&answer.body)
                    ));
                }
            }
            Err(e) => row.fail(format!("client task: {e}")),
        }
    }
    drop(front);
    row
}

/// Reads a stream to its end, telling `started` once the first event came.
async fn read_stream_signalling(
    client: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
    started: tokio::sync::mpsc::Sender<()>,
) -> (u16, String, Duration) {
    use futures::StreamExt;
    let t = std::time::Instant::now();
    let Ok(Ok(reply)) = tokio::time::timeout(
        Duration::from_secs(20),
        client
            .post(format!("{url}/v1/chat/completions"))
            .json(body)
            .send(),
    )
    .await
    else {
        return (0, String::new(), t.elapsed());
    };
    let status = reply.status().as_u16();
    let mut text = String::new();
    let mut told = false;
    let mut chunks = reply.bytes_stream();
    while let Ok(Some(chunk)) = tokio::time::timeout(Duration::from_secs(40), chunks.next()).await {
        let Ok(chunk) = chunk else {
            text.push_str("<transport error>");
            break;
        };
        text.push_str(&String::from_utf8_lossy(&chunk));
        if !told && text.contains("\"content\"") {
            told = true;
            let _ = started.send(()).await;
        }
    }
    (status, text, t.elapsed())
}

fn tail(body: &str) -> &str {
    &body[body.len().saturating_sub(160)..]
}

/// Forwards requests through a front agent to two replicas, one of them
/// stopped: every request must be answered by the other within the read
/// timeout.
pub async fn stopped_peer(dir: &std::path::Path) -> Row {
    let mut row = Row::new("peer stopped (SIGSTOP) under load");
    let model = tiny_model(dir);
    let b1 = Agent::start(&["--model", &model, "--served-name", "beta"]);
    let b2 = Agent::start(&["--model", &model, "--served-name", "beta"]);
    let front = Agent::start(&[
        "--model",
        &model,
        "--served-name",
        "front",
        "--peer",
        &b1.url,
        "--peer",
        &b2.url,
    ]);
    if let Err(e) = wait_for_models(&front.url, &["beta"]).await {
        row.problems.push(e);
        return row;
    }
    b1.signal("STOP");
    let client = reqwest::Client::new();
    let tasks: Vec<_> = (0..4)
        .map(|w| {
            let (client, url) = (client.clone(), front.url.clone());
            tokio::spawn(async move {
                let mut answers = Vec::new();
                for i in 0..6 {
                    let body = chat("beta", &format!("question {w}-{i}"), 8, i % 2 == 0);
                    answers.push((
                        i % 2 == 0,
                        post(&client, &url, &body, READ_TIMEOUT * 3).await,
                    ));
                }
                answers
            })
        })
        .collect();
    for t in tasks {
        for (stream, a) in t.await.unwrap_or_default() {
            row.sent += 1;
            row.took(a.total);
            let whole = a.status == 200 && (!stream || a.clean_stream()) && a.error.is_none();
            if whole && a.total <= READ_TIMEOUT + Duration::from_secs(1) {
                row.served += 1;
            } else if whole {
                row.fail(format!("answered only after {:?}", a.total));
            } else {
                row.fail(format!(
                    "status {} error {:?}: {}",
                    a.status,
                    a.error,
                    tail(&a.body)
                ));
            }
        }
    }
    b1.signal("CONT");
    drop((b1, b2, front));
    row
}
