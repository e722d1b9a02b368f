//! The chaos suite: agents as real processes on loopback, attacked and
//! broken on purpose in bounded loops (slow and idle clients, peers killed
//! or stopped mid-request, Redis stopped and killed under load, overload
//! far past capacity), each scenario reduced to one [`Row`] of a table
//! that says what was sent, what was served, what was refused as it should
//! be, what failed, and the worst latency seen. `weir-chaos` runs them.

pub mod conns;
pub mod overload;
pub mod peers;
pub mod redis;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};

/// What one scenario did and whether the agent held up.
#[derive(Debug, Default)]
pub struct Row {
    /// Scenario name.
    pub scenario: &'static str,
    /// Requests or connections thrown at the agent.
    pub sent: usize,
    /// Answered as a well-behaved client expects.
    pub served: usize,
    /// Refused or cut as the limits say they must be (429, 503, 408,
    /// closed, a stream ended with an error event and `[DONE]`).
    pub refused: usize,
    /// Anything else: lost, hung, truncated, wrong status.
    pub failed: usize,
    /// Longest time one of them took.
    pub worst: Duration,
    /// Why the scenario failed, if it did.
    pub problems: Vec<String>,
}

impl Row {
    /// An empty row for `scenario`.
    pub fn new(scenario: &'static str) -> Self {
        Self {
            scenario,
            ..Self::default()
        }
    }

    /// Notes a failure.
    pub fn fail(&mut self, why: impl Into<String>) {
        self.failed += 1;
        if self.problems.len() < 5 {
            self.problems.push(why.into());
        }
    }

    /// Notes a time taken.
    pub fn took(&mut self, d: Duration) {
        self.worst = self.worst.max(d);
    }

    /// Whether the agent held up.
    pub fn passed(&self) -> bool {
        self.failed == 0 && self.problems.is_empty()
    }
}

/// The table of all rows, as printed.
pub fn table(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<34} {:>6} {:>7} {:>8} {:>7} {:>9}  result\n",
        "scenario", "sent", "served", "refused", "failed", "worst"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:<34} {:>6} {:>7} {:>8} {:>7} {:>8.2}s  {}",
            r.scenario,
            r.sent,
            r.served,
            r.refused,
            r.failed,
            r.worst.as_secs_f64(),
            if r.passed() { "ok" } else { "FAILED" }
        );
        for p in &r.problems {
            let _ = writeln!(out, "    - {p}");
        }
    }
    out
}

/// A chat completion body.
pub fn chat(model: &str, content: &str, max_tokens: u32, stream: bool) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": content}],
           "max_tokens": max_tokens, "temperature": 0, "stream": stream})
}

/// What came back for one request.
#[derive(Debug)]
pub struct Answer {
    /// HTTP status (0: no answer at all).
    pub status: u16,
    /// `Retry-After`, if sent.
    pub retry_after: Option<String>,
    /// The whole body (for a stream: every event, concatenated).
    pub body: String,
    /// Time to the response head.
    pub head: Duration,
    /// Time to the end of the body.
    pub total: Duration,
    /// Transport error, if any.
    pub error: Option<String>,
}

impl Answer {
    /// A stream that ended with `[DONE]` and no error event.
    pub fn clean_stream(&self) -> bool {
        self.body.trim_end().ends_with("data: [DONE]") && !self.body.contains("\"error\"")
    }

    /// A stream that ended with an OpenAI error event and then `[DONE]`.
    pub fn stream_ended_with_error(&self) -> bool {
        let events: Vec<&str> = self
            .body
            .split("\n\n")
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .collect();
        matches!(events.as_slice(), [.., error, done]
            if *done == "data: [DONE]" && error.starts_with("data: {\"error\""))
    }
}

/// Posts `body` to `{url}/v1/chat/completions` and reads the whole answer,
/// giving up after `limit`.
pub async fn post(client: &reqwest::Client, url: &str, body: &Value, limit: Duration) -> Answer {
    let started = Instant::now();
    let mut answer = Answer {
        status: 0,
        retry_after: None,
        body: String::new(),
        head: Duration::ZERO,
        total: Duration::ZERO,
        error: None,
    };
    let send = client
        .post(format!("{url}/v1/chat/completions"))
        .json(body)
        .send();
    let reply = match tokio::time::timeout(limit, send).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            answer.error = Some(e.to_string());
            answer.total = started.elapsed();
            return answer;
        }
        Err(_) => {
            answer.error = Some(format!("no answer within {limit:?}"));
            answer.total = started.elapsed();
            return answer;
        }
    };
    answer.head = started.elapsed();
    answer.status = reply.status().as_u16();
    answer.retry_after = reply
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut body = reply.bytes_stream();
    let deadline = started + limit;
    loop {
        match tokio::time::timeout_at(deadline.into(), body.next()).await {
            Ok(Some(Ok(chunk))) => answer.body.push_str(&String::from_utf8_lossy(&chunk)),
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                answer.error = Some(format!("body broke off: {e}"));
                break;
            }
            Err(_) => {
                answer.error = Some(format!("body not finished within {limit:?}"));
                break;
            }
        }
    }
    answer.total = started.elapsed();
    answer
}

/// Waits until `{url}/v1/models` lists every model in `wanted`.
pub async fn wait_for_models(url: &str, wanted: &[&str]) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ids: Vec<String> = match reqwest::get(format!("{url}/v1/models")).await {
            Ok(r) => r.json::<Value>().await.ok().map_or_else(Vec::new, |m| {
                m["data"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|m| m["id"].as_str().map(str::to_owned))
                    .collect()
            }),
            Err(_) => Vec::new(),
        };
        if wanted.iter().all(|w| ids.iter().any(|i| i == w)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{url} never listed {wanted:?} (has {ids:?})"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A tiny random-weight Llama model written into `dir`.
pub fn tiny_model(dir: &std::path::Path) -> String {
    let path = dir.join("tiny");
    weir_engine::testmodel::write_tiny_model(
        &path,
        &weir_engine::testmodel::TinyModelSpec::llama(),
    )
    .expect("the tiny model can be written");
    path.to_str().expect("a UTF-8 path").to_owned()
}
