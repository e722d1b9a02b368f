//! A steady stream of chat requests through the agents, counting what is
//! sent and answered and recording what fails.
//!
//! A request fails when it gets no HTTP answer, an answer other than 200,
//! or (streaming) a body that does not end with `data: [DONE]` or carries an
//! error event. A request that got an HTTP answer is never retried.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::task::JoinHandle;

/// Failures printed as they happen (all are recorded).
const SHOWN: usize = 40;

/// How a client picks the agent for each request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Steering {
    /// Each client sends to its own agent, always.
    Fixed,
    /// Each request goes to an agent whose `/ready` answered 200 at the
    /// last probe (every 200 ms), the client's own first; a connection
    /// refused is tried once more on another such agent.
    ///
    /// This stands in for a client in front of a Service: kube-proxy sends
    /// a new connection only to endpoints whose readiness probe passes,
    /// and a connection to an endpoint that has just gone is refused before
    /// any byte of the request was sent, so a client (or a proxy) can try
    /// another endpoint without risk of running the request twice.
    Readiness,
}

/// What the clients send.
#[derive(Clone, Copy, Debug)]
pub struct Load {
    /// Clients per agent sending non-streaming chats.
    pub chats: usize,
    /// Clients per agent sending streaming chats.
    pub streams: usize,
    /// How each request picks its agent.
    pub steering: Steering,
}

/// Counts shared by the clients.
#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    answered: AtomicU64,
    failures: Mutex<Vec<String>>,
}

/// Clients asking one Model, one request after another each.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    clients: Vec<JoinHandle<()>>,
}

/// How one request went.
enum Outcome {
    Answered,
    /// No connection could be made: nothing reached the agent.
    Refused(String),
    Failed(String),
}

impl Traffic {
    /// One client per agent URL, each sending short chats for `model` to
    /// its agent until stopped.
    pub fn start(urls: &[String], model: &str) -> Self {
        let load = Load {
            chats: 1,
            streams: 0,
            steering: Steering::Fixed,
        };
        Self::with(urls, model, load)
    }

    /// `load`'s clients for every agent URL, asking `model` until stopped.
    pub fn with(urls: &[String], model: &str, load: Load) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Tally::default());
        let ready = Arc::new(Mutex::new(vec![true; urls.len()]));
        let mut clients = Vec::new();
        if load.steering == Steering::Readiness {
            clients.push(tokio::spawn(probe(
                urls.to_vec(),
                ready.clone(),
                stop.clone(),
            )));
        }
        let started = Instant::now();
        let kinds = (0..load.chats)
            .map(|_| false)
            .chain((0..load.streams).map(|_| true));
        for stream in kinds {
            for home in 0..urls.len() {
                let client = Client {
                    urls: urls.to_vec(),
                    home,
                    model: model.to_owned(),
                    stream,
                    steering: load.steering,
                    ready: ready.clone(),
                    started,
                };
                let (stop, tally) = (stop.clone(), tally.clone());
                clients.push(tokio::spawn(client.run(stop, tally)));
            }
        }
        Self {
            stop,
            tally,
            clients,
        }
    }

    /// Requests answered so far.
    pub fn answered(&self) -> u64 {
        self.tally.answered.load(Ordering::SeqCst)
    }

    /// Requests that failed so far.
    pub fn failed(&self) -> usize {
        self.tally.failures.lock().unwrap().len()
    }

    /// Stops the clients once their requests in flight are done; the
    /// number answered and the failures (agent, what, when).
    pub async fn stop(self) -> (u64, Vec<String>) {
        let (sent, answered, failures) = self.finish().await;
        eprintln!(
            "traffic: {sent} requests sent, {answered} answered, {} failed",
            failures.len()
        );
        (answered, failures)
    }

    /// Stops the clients once their requests in flight are done; requests
    /// sent, answered, and the failures (agent, what, when).
    pub async fn finish(self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        for c in self.clients {
            c.await.expect("a traffic client");
        }
        let failures = self.tally.failures.lock().unwrap().clone();
        let sent = self.tally.sent.load(Ordering::SeqCst);
        (sent, self.tally.answered.load(Ordering::SeqCst), failures)
    }
}

/// Keeps `ready[i]` to whether `urls[i]/ready` answered 200 (within 1 s) at
/// the last probe, every 200 ms, until `stop`.
async fn probe(urls: Vec<String>, ready: Arc<Mutex<Vec<bool>>>, stop: Arc<AtomicBool>) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    while !stop.load(Ordering::SeqCst) {
        for (i, url) in urls.iter().enumerate() {
            let answer = client.get(format!("{url}/ready")).send().await;
            let up = answer.is_ok_and(|r| r.status().as_u16() == 200);
            ready.lock().unwrap()[i] = up;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One client: requests one after another.
struct Client {
    urls: Vec<String>,
    home: usize,
    model: String,
    stream: bool,
    steering: Steering,
    ready: Arc<Mutex<Vec<bool>>>,
    started: Instant,
}

impl Client {
    async fn run(self, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
        let kind = if self.stream { "stream" } else { "chat" };
        for i in 0.. {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let Some(first) = self.pick(None) else {
                // No agent is ready: a Service would have no endpoint.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            tally.sent.fetch_add(1, Ordering::SeqCst);
            let prompt = format!("steady {kind} {} {i}", self.home);
            let mut outcome = send(&self.urls[first], &self.model, &prompt, self.stream).await;
            let mut url = &self.urls[first];
            if let Outcome::Refused(why) = &outcome
                && let Some(next) = self.pick(Some(first))
            {
                eprintln!(
                    "traffic: {url} refused ({why}); once more on {}",
                    self.urls[next]
                );
                url = &self.urls[next];
                outcome = send(url, &self.model, &prompt, self.stream).await;
            }
            let at = self.started.elapsed().as_secs_f64();
            match outcome {
                Outcome::Answered => {
                    tally.answered.fetch_add(1, Ordering::SeqCst);
                }
                Outcome::Refused(why) | Outcome::Failed(why) => {
                    let failure = format!("{url} ({kind}): {why} at {at:.1} s");
                    let mut failures = tally.failures.lock().unwrap();
                    if failures.len() < SHOWN {
                        eprintln!("traffic: FAILED {failure}");
                    }
                    failures.push(failure);
                }
            }
        }
    }

    /// The agent for the next request (never `not`): the client's own
    /// with fixed steering; else the first ready one from its own on.
    fn pick(&self, not: Option<usize>) -> Option<usize> {
        if self.steering == Steering::Fixed {
            return Some(self.home).filter(|h| Some(*h) != not);
        }
        let ready = self.ready.lock().unwrap().clone();
        (0..self.urls.len())
            .map(|k| (self.home + k) % self.urls.len())
            .find(|&i| ready[i] && Some(i) != not)
    }
}

/// One chat for `model` to `url` (a new connection each time, as a client
/// through a Service makes), short and streaming or not.
async fn send(url: &str, model: &str, prompt: &str, stream: bool) -> Outcome {
    let body = json!({"model": model, "messages": [{"role": "user", "content": prompt}],
        "max_tokens": if stream { 12 } else { 4 }, "temperature": 1.0, "stream": stream});
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let answer = client
        .post(format!("{url}/v1/chat/completions"))
        .json(&body)
        .send()
        .await;
    let answer = match answer {
        Ok(a) => a,
        Err(e) if e.is_connect() => return Outcome::Refused(format!("no connection: {e}")),
        Err(e) => return Outcome::Failed(format!("no answer: {e}")),
    };
    let status = answer.status().as_u16();
    let text = match answer.text().await {
        Ok(t) => t,
        Err(e) => return Outcome::Failed(format!("status {status}, body cut: {e}")),
    };
    let skip = text.chars().count().saturating_sub(300);
    let tail: String = text.chars().skip(skip).collect();
    if status != 200 {
        return Outcome::Failed(format!("status {status}: {tail}"));
    }
    if stream && (!text.trim_end().ends_with("data: [DONE]") || text.contains("\"error\"")) {
        return Outcome::Failed(format!("stream ended badly: {tail}"));
    }
    Outcome::Answered
}
