//! One streaming chat request, measured: time to first token, gaps
//! between tokens, the cache tier and replica headers, and the text.

use std::time::Instant;

use futures::StreamExt;
use serde_json::Value;

use crate::report::Outcome;

/// Header naming the agent whose engine answered.
pub const REPLICA_HEADER: &str = "x-weir-replica";

/// Sends one streaming chat request and measures it; the answer's text
/// and the replica that generated it are kept.
pub async fn one(client: &reqwest::Client, url: &str, body: Value) -> Outcome {
    let started = Instant::now();
    let send = || {
        client
            .post(format!("{url}/v1/chat/completions"))
            .json(&body)
            .send()
    };
    // A request that got no answer at all (typically sent on a kept-alive
    // connection the server closed just then, as llama-server does after
    // a few requests) is sent once more; the time counts from the first
    // try, and a second failure is a failure.
    let response = match send().await {
        Ok(r) => r,
        Err(_) => match send().await {
            Ok(r) => r,
            Err(_) => return Outcome::failed(0, started.elapsed()),
        },
    };
    let status = response.status().as_u16();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (tier, coalesced) = (header("x-weir-cache"), header("x-weir-coalesced").is_some());
    let replica = header(REPLICA_HEADER);
    if status != 200 {
        return Outcome::failed(status, started.elapsed());
    }
    let mut outcome = Outcome {
        status,
        tier,
        coalesced,
        replica,
        ..Outcome::default()
    };
    let mut last = None;
    let mut buffer = String::new();
    let mut chunks = response.bytes_stream();
    while let Some(Ok(chunk)) = chunks.next().await {
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let Ok(value) = serde_json::from_str::<Value>(data) else {
                continue;
            };
            if let Some(tokens) = value["usage"]["completion_tokens"].as_u64() {
                outcome.tokens = tokens;
            }
            if let Some(text) = value["choices"][0]["delta"]["content"]
                .as_str()
                .filter(|t| !t.is_empty())
            {
                outcome.text.push_str(text);
                let now = Instant::now();
                match last {
                    None => outcome.ttft = Some(now - started),
                    Some(prev) => outcome.gaps.push(now - prev),
                }
                last = Some(now);
            }
        }
    }
    outcome.e2e = started.elapsed();
    outcome
}
