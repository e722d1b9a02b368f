//! `GET /v1/weir/kv` over real HTTP, serving the built-in model: a first
//! ask gets a snapshot of what the prefix cache holds, later asks get the
//! blocks added since; the hashes are the ones a router computes from the
//! prompt's tokens; bad queries and unknown models get OpenAI errors.

use serde_json::{Value, json};
use weir_agent::http::{AppState, router};
use weir_agent::models::{ModelRegistry, ModelSpec, ServedModel, ensure_builtin};
use weir_agent::route::prefix::block_hashes;
use weir_agent::route::summary::KvReport;

async fn start() -> (String, std::sync::Arc<ServedModel>) {
    let root = std::env::temp_dir().join(format!("weir-agent-kv-{}", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    let spec = ModelSpec {
        name: "tiny".into(),
        dir: ensure_builtin(&root).unwrap(),
        engine: Default::default(),
        cache: Default::default(),
        batch: Default::default(),
        redis_url: None,
    };
    let mut registry = ModelRegistry::default();
    registry.insert(ServedModel::load(&spec).unwrap());
    let model = registry.get("tiny").unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = AppState::new(registry);
    tokio::spawn(async move { axum::serve(listener, router(state)).await });
    (format!("http://{addr}"), model)
}

async fn kv(base: &str, query: &str) -> (u16, Value) {
    let r = reqwest::get(format!("{base}/v1/weir/kv?{query}"))
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn summaries_follow_the_prefix_cache_as_snapshots_then_deltas() {
    let (base, model) = start().await;
    let (status, first) = kv(&base, "model=tiny").await;
    assert_eq!(status, 200, "{first}");
    let first: KvReport = serde_json::from_value(first).unwrap();
    assert!(first.snapshot && first.added.is_empty(), "{first:?}");
    assert_eq!(first.block_size, 16);

    let prompt: Vec<u32> = (1..=70).collect();
    let body = json!({"model": "tiny", "prompt": prompt, "max_tokens": 1, "temperature": 0});
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The engine publishes after its step; wait on the condition.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let delta = loop {
        let q = format!("model=tiny&epoch={}&since={}", first.epoch, first.seq);
        let (_, v) = kv(&base, &q).await;
        let report: KvReport = serde_json::from_value(v).unwrap();
        if !report.added.is_empty() {
            break report;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no block was published"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(!delta.snapshot, "a reader that is up to date gets a delta");
    let expected: Vec<u64> = block_hashes(&prompt, 16).iter().map(|h| h.0).collect();
    assert_eq!(expected.len(), 4);
    for h in &expected {
        assert!(
            delta.added.contains(h),
            "the router's hash {h} is not published: {delta:?}"
        );
    }
    assert_eq!(
        model
            .engine
            .stats()
            .kv_summary()
            .leading_held(&block_hashes(&prompt, 16)),
        4
    );
    // Another lifetime's sequence number: a snapshot.
    let (_, v) = kv(&base, &format!("model=tiny&epoch=1&since={}", delta.seq)).await;
    assert_eq!(v["snapshot"], true);

    let (status, body) = kv(&base, "model=nope").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );
    let (status, body) = kv(&base, "since=x").await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["message"].is_string());
}
