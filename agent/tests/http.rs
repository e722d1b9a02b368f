//! The agent over real HTTP on a loopback socket, serving the built-in model:
//! the OpenAI routes, streaming, errors in OpenAI's shape, overload, many
//! concurrent streams, and client disconnects freeing engine resources.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};
use weir_agent::http::{AppState, router};
use weir_agent::models::{ModelRegistry, ModelSpec, ServedModel, ensure_builtin};
use weir_crds::BatchPolicySpec;

fn builtin_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("weir-agent-http-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        ensure_builtin(&root).unwrap()
    })
    .clone()
}

/// Starts an agent serving the built-in model as `tiny`; returns its base URL.
async fn start(batch: BatchPolicySpec) -> String {
    start_with_key(batch, None).await
}

async fn start_with_key(batch: BatchPolicySpec, key: Option<&str>) -> String {
    let spec = ModelSpec {
        name: "tiny".into(),
        dir: builtin_dir(),
        engine: Default::default(),
        cache: Default::default(),
        batch,
        redis_url: None,
    };
    let mut registry = ModelRegistry::default();
    registry.insert(ServedModel::load(&spec).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = AppState::with(registry, Default::default(), key.map(str::to_owned));
    tokio::spawn(async move { axum::serve(listener, router(state)).await });
    format!("http://{addr}")
}

fn chat(content: &str, max_tokens: u32) -> Value {
    json!({"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0})
}

async fn post(base: &str, path: &str, body: &Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

/// Reads an SSE response to the end: the JSON of each `data:` line, and
/// whether it ended with `[DONE]`.
async fn sse(resp: reqwest::Response) -> (Vec<Value>, bool) {
    let body = resp.text().await.unwrap();
    let mut events = Vec::new();
    let mut done = false;
    for line in body.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line == "[DONE]" {
            done = true;
        } else {
            events.push(serde_json::from_str(line).unwrap());
        }
    }
    (events, done)
}

async fn metric(base: &str, name: &str) -> f64 {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains(name), "metric {name} missing");
    metric_or_zero(base, name).await
}

async fn metric_or_zero(base: &str, name: &str) -> f64 {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains("model_name=\"tiny\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_json_and_stream_agree_and_report_usage() {
    let base = start(BatchPolicySpec::default()).await;
    let (status, body) = post(&base, "/v1/chat/completions", &chat("Hello there", 12)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    let text = body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    let usage = &body["usage"];
    assert_eq!(
        usage["total_tokens"],
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );

    let mut req = chat("Hello there", 12);
    req["stream"] = json!(true);
    req["stream_options"] = json!({"include_usage": true});
    let resp = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(&req)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let (events, done) = sse(resp).await;
    assert!(done, "stream did not end with [DONE]");
    let streamed: String = events
        .iter()
        .flat_map(|e| e["choices"].as_array().cloned().unwrap_or_default())
        .filter_map(|c| c["delta"]["content"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(streamed, text, "greedy stream and JSON differ");
    let last = events.last().unwrap();
    assert_eq!(last["choices"].as_array().unwrap().len(), 0);
    assert_eq!(
        last["usage"]["completion_tokens"],
        usage["completion_tokens"]
    );
    let finish = events
        .iter()
        .rev()
        .find_map(|e| e["choices"][0]["finish_reason"].as_str())
        .unwrap();
    assert_eq!(
        finish,
        body["choices"][0]["finish_reason"].as_str().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_models_n_and_logprobs() {
    let base = start(BatchPolicySpec::default()).await;
    let models: Value = reqwest::get(format!("{base}/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "tiny");
    let (status, body) = post(
        &base,
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "The cache", "max_tokens": 5, "n": 3, "seed": 7, "temperature": 1.0, "logprobs": 2}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let choices = body["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    assert_eq!(body["usage"]["completion_tokens"], 15);
    let lp = &choices[0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 5);
    assert!(lp["token_logprobs"][0].as_f64().unwrap() <= 0.0);
    assert!(lp["top_logprobs"][0].as_object().unwrap().len() <= 2);
    // Same seed, same answers.
    let (_, again) = post(
        &base,
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "The cache", "max_tokens": 5, "n": 3, "seed": 7, "temperature": 1.0}),
    )
    .await;
    for i in 0..3 {
        assert_eq!(again["choices"][i]["text"], choices[i]["text"]);
    }
}

/// Sends only the headers of a POST declaring `length` bytes, and reads the
/// answer: status line and body.
async fn raw_post(base: &str, path: &str, length: usize) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.to_owned(), body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors() {
    let base = start(BatchPolicySpec::default()).await;
    let client = reqwest::Client::new();
    let raw = |body: Vec<u8>| {
        client
            .post(format!("{base}/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"{not json".to_vec(), 400, "not valid JSON"),
        (b"{\"model\": \"tiny\", \"messages\": [{\"role\": \"user\", \"content\": \"\xff\"}]}".to_vec(), 400, "UTF-8"),
        (br#"{"model": "tiny"}"#.to_vec(), 422, "messages"),
        (br#"{"model": "tiny", "messages": [], "max_tokens": 5}"#.to_vec(), 400, "messages"),
        (br#"{"model": "tiny", "messages": [{"role":"user","content":"x"}], "max_tokens": "ten"}"#.to_vec(), 422, "max_tokens"),
        (br#"{"model": "tiny", "messages": [{"role":"user","content":"x"}], "max_tokens": -1}"#.to_vec(), 400, "max_tokens"),
        (br#"{"model": "tiny", "messages": [{"role":"user","content":"x"}], "max_tokens": 100000000}"#.to_vec(), 400, "max_tokens"),
        (br#"{"model": "tiny", "messages": [{"role":"user","content":"x"}], "temperature": 9}"#.to_vec(), 400, "temperature"),
        (br#"{"model": "tiny", "messages": [{"role":"user","content":"x"}], "priority": "urgent"}"#.to_vec(), 400, "priority"),
        (br#"{"model": "missing", "messages": [{"role":"user","content":"x"}]}"#.to_vec(), 404, "missing"),
    ];
    for (body, status, needle) in cases {
        let r = raw(body).await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{needle}");
        let err: Value = r.json().await.unwrap();
        let message = err["error"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("no OpenAI error body: {err}"));
        assert!(message.contains(needle), "{status}: {message}");
        assert!(err["error"]["type"].is_string());
    }
    // A 10 MB body: answered 413 as soon as the headers arrive (a raw
    // socket, so the early answer is read before the body is sent).
    let (head, body) = raw_post(&base, "/v1/chat/completions", 10 * 1024 * 1024).await;
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert!(
        body.contains("larger than") && body.contains("invalid_request_error"),
        "{body}"
    );
    let r = client
        .get(format!("{base}/v2/unknown"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let r = client
        .post(format!("{base}/v1/chat/completions"))
        .header("x-weir-priority", "nonsense")
        .json(&chat("x", 2))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_answered_429_with_retry_after_never_a_hang() {
    let mut batch = BatchPolicySpec {
        max_num_seqs: 2,
        ..Default::default()
    };
    batch.queue.max_queued = 4;
    let base = start(batch).await;
    let client = reqwest::Client::new();
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let client = client.clone();
            let url = format!("{base}/v1/chat/completions");
            tokio::spawn(async move {
                let r = client
                    .post(url)
                    .json(&chat(&format!("load {i}"), 24))
                    .send()
                    .await
                    .unwrap();
                let retry = r
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().to_owned());
                let status = r.status().as_u16();
                let body = r.text().await.unwrap();
                (status, retry, body)
            })
        })
        .collect();
    let results = tokio::time::timeout(Duration::from_secs(120), futures::future::join_all(tasks))
        .await
        .expect("requests hung");
    let mut ok = 0;
    let mut limited = 0;
    for r in results {
        match r.unwrap() {
            (200, _, _) => ok += 1,
            (429, Some(after), _) => {
                assert!(after.parse::<u64>().unwrap() >= 1);
                limited += 1;
            }
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert!(ok >= 2 && limited > 0, "ok {ok}, limited {limited}");
    assert!(metric(&base, "weir_rejected_requests_total").await >= limited as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_shed_in_the_queue_is_a_429_not_a_200() {
    let mut batch = BatchPolicySpec {
        max_num_seqs: 1,
        ..Default::default()
    };
    batch.queue.timeout_seconds = 1;
    let base = start(batch).await;
    let client = reqwest::Client::new();
    // One long answer holds the only slot for well over the queue timeout.
    let mut long = chat("hold the slot", 1800);
    long["ignore_eos"] = json!(true);
    long["n"] = json!(2);
    let holder = {
        let (client, url) = (client.clone(), format!("{base}/v1/chat/completions"));
        tokio::spawn(async move { client.post(url).json(&long).send().await.unwrap().status() })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut body = chat("wait in line", 4);
    body["stream"] = json!(true);
    let r = client
        .post(format!("{base}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let retry = r.headers().get("retry-after").cloned();
    let text = r.text().await.unwrap();
    assert_eq!(status, 429, "shed before its first token: {text}");
    assert!(retry.is_some(), "429 without Retry-After");
    let error: Value = serde_json::from_str(&text).expect("an OpenAI error body, not SSE");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("queue timeout")
    );
    assert_eq!(holder.await.unwrap().as_u16(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_streams_all_complete() {
    let base = start(BatchPolicySpec::default()).await;
    let client = reqwest::Client::new();
    let tasks: Vec<_> = (0..500)
        .map(|i| {
            let client = client.clone();
            let url = format!("{base}/v1/chat/completions");
            tokio::spawn(async move {
                let mut body = chat(&format!("client {i}"), 4);
                body["stream"] = json!(true);
                let r = client.post(url).json(&body).send().await.unwrap();
                assert_eq!(r.status().as_u16(), 200);
                sse(r).await
            })
        })
        .collect();
    let results = tokio::time::timeout(Duration::from_secs(300), futures::future::join_all(tasks))
        .await
        .expect("streams hung");
    for r in results {
        let (events, done) = r.unwrap();
        assert!(done);
        assert!(
            events
                .iter()
                .any(|e| e["choices"][0]["finish_reason"].is_string()),
            "{events:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnected_client_frees_its_slot() {
    let base = start(BatchPolicySpec::default()).await;
    let mut body = chat("go on for a long time", 1500);
    body["stream"] = json!(true);
    body["ignore_eos"] = json!(true);
    let resp = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut chunks = resp.bytes_stream();
    chunks.next().await.unwrap().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&base, "vllm:num_requests_running").await < 1.0 {
        assert!(Instant::now() < deadline, "request never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(chunks);
    while metric(&base, "vllm:num_requests_running").await > 0.0
        || metric(&base, "vllm:kv_cache_usage_perc").await > 0.0
    {
        assert!(
            Instant::now() < deadline,
            "the engine kept generating for a client that left"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(metric(&base, "vllm:generation_tokens_total").await < 1500.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_is_required_when_configured() {
    let base = start_with_key(BatchPolicySpec::default(), Some("s3cret")).await;
    let client = reqwest::Client::new();
    let url = format!("{base}/v1/chat/completions");
    let r = client.post(&url).json(&chat("hi", 2)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let err: Value = r.json().await.unwrap();
    assert_eq!(err["error"]["type"], "authentication_error");
    let r = client
        .post(&url)
        .bearer_auth("wrong")
        .json(&chat("hi", 2))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = client
        .post(&url)
        .bearer_auth("s3cret")
        .json(&chat("hi", 2))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // Probes and metrics stay open for the kubelet and Prometheus.
    assert_eq!(
        reqwest::get(format!("{base}/health"))
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    assert_eq!(
        reqwest::get(format!("{base}/metrics"))
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deterministic_answers_are_cached_and_sampled_ones_never() {
    let base = start(BatchPolicySpec::default()).await;
    let client = reqwest::Client::new();
    let url = format!("{base}/v1/chat/completions");
    let send = |body: Value| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let r = client.post(url).json(&body).send().await.unwrap();
            let tier = r
                .headers()
                .get("x-weir-cache")
                .map(|v| v.to_str().unwrap().to_owned());
            (tier, r.json::<Value>().await.unwrap())
        }
    };
    let (first_tier, first) = send(chat("cache me", 8)).await;
    let (second_tier, second) = send(chat("cache me", 8)).await;
    assert_eq!(first_tier.as_deref(), Some("miss"));
    assert_eq!(second_tier.as_deref(), Some("l1"));
    assert_eq!(first["choices"], second["choices"]);
    assert_eq!(first["usage"], second["usage"]);
    // A streamed request for the same answer is served from the cache too.
    let mut streamed = chat("cache me", 8);
    streamed["stream"] = json!(true);
    let r = client.post(&url).json(&streamed).send().await.unwrap();
    assert_eq!(r.headers()["x-weir-cache"], "l1");
    let (events, done) = sse(r).await;
    assert!(done);
    let text: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        text,
        first["choices"][0]["message"]["content"].as_str().unwrap()
    );
    // Sampled without a seed: never from the cache.
    let mut sampled = chat("cache me", 8);
    sampled["temperature"] = json!(0.9);
    for _ in 0..2 {
        let (tier, _) = send(sampled.clone()).await;
        assert_eq!(tier, None, "sampled output must not be cached");
    }
    assert!(metric(&base, "weir_cache_hits_total").await >= 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_requests_in_flight_share_one_generation() {
    let base = start(BatchPolicySpec::default()).await;
    let mut body = chat("share this", 200);
    body["stream"] = json!(true);
    body["ignore_eos"] = json!(true);
    let before = metric(&base, "vllm:generation_tokens_total").await;
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (url, body) = (format!("{base}/v1/chat/completions"), body.clone());
            tokio::spawn(async move {
                let r = reqwest::Client::new()
                    .post(url)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                let coalesced = r.headers().contains_key("x-weir-coalesced");
                let (events, done) = sse(r).await;
                let text: String = events
                    .iter()
                    .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
                    .collect();
                (coalesced, done, text)
            })
        })
        .collect();
    let results: Vec<_> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert!(results.iter().all(|(_, done, _)| *done));
    assert!(
        results.iter().all(|(_, _, text)| *text == results[0].2),
        "every subscriber gets the full stream"
    );
    let shared = results.iter().filter(|(c, _, _)| *c).count();
    let generated = metric(&base, "vllm:generation_tokens_total").await - before;
    // Requests that joined shared the leader's tokens; the rest (if any
    // arrived after it finished) were cache hits.
    assert!(
        generated <= 200.0,
        "{generated} tokens generated for {shared} shared requests"
    );
    let reused = metric_or_zero(&base, "weir_coalesced_requests_total").await
        + metric_or_zero(&base, "weir_cache_hits_total").await;
    assert!(reused >= 3.0, "shared {shared}, reused {reused}");
}
