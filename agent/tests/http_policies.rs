//! The agent over real HTTP with policies that change a request's path:
//! the prompt optimization (tokens saved, counted, and more cache hits),
//! fitting a long chat into the context by dropping its oldest turns, and
//! Redis trouble shown in the metrics.

use std::path::PathBuf;
use std::sync::OnceLock;

use serde_json::{Value, json};
use weir_agent::http::{AppState, router};
use weir_agent::models::{ModelRegistry, ModelSpec, ServedModel, ensure_builtin};
use weir_crds::BatchPolicySpec;
use weir_crds::cache_policy::{CachePolicySpec, PromptOptimization};
use weir_crds::common::{ContextOverflow, EngineConfig};

fn builtin_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("weir-agent-policies-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        ensure_builtin(&root).unwrap()
    })
    .clone()
}

async fn start(engine: EngineConfig, cache: CachePolicySpec, redis_url: Option<String>) -> String {
    let spec = ModelSpec {
        name: "tiny".into(),
        dir: builtin_dir(),
        engine,
        cache,
        batch: BatchPolicySpec::default(),
        redis_url,
    };
    let mut registry = ModelRegistry::default();
    registry.insert(ServedModel::load(&spec).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let state = AppState::new(registry);
    tokio::spawn(async move { axum::serve(listener, router(state)).await });
    base
}

/// Posts a chat; status, headers and body.
async fn chat(
    base: &str,
    body: &Value,
    header: Option<(&str, &str)>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut request = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(body);
    if let Some((name, value)) = header {
        request = request.header(name, value);
    }
    let r = request.send().await.unwrap();
    let (status, headers) = (r.status().as_u16(), r.headers().clone());
    (status, headers, r.json().await.unwrap())
}

async fn metrics(base: &str) -> String {
    reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn value_of(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prompt_optimization_saves_tokens_and_meets_the_cache() {
    let base = start(EngineConfig::default(), CachePolicySpec::default(), None).await;
    let messy =
        "Tell   me\n\n\n\nabout    rivers.\nabout    rivers.\n*   the Nile\n*   the Rhine   ";
    let clean = "Tell me\n\nabout rivers.\n- the Nile\n- the Rhine";
    let ask = |content: &str| {
        json!({"model": "tiny", "messages": [{"role": "user", "content": content}],
               "max_tokens": 4, "temperature": 0})
    };
    // Off by default: the usage carries no saved count.
    let (status, _, plain) = chat(&base, &ask(messy), None).await;
    assert_eq!(status, 200);
    assert!(
        plain["usage"].get("prompt_tokens_saved").is_none(),
        "{plain}"
    );

    let on = Some(("x-weir-prompt-optimization", "conservative"));
    let (status, headers, optimized) = chat(&base, &ask(clean), on).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-weir-cache"], "miss");
    assert_eq!(
        optimized["usage"]["prompt_tokens_saved"], 0,
        "nothing to save"
    );
    // The messy prompt, optimized, is the clean one: a cache hit.
    let (status, headers, saved) = chat(&base, &ask(messy), on).await;
    assert_eq!(status, 200);
    assert_eq!(
        headers["x-weir-cache"], "l1",
        "optimized prompts meet in the cache"
    );
    let n = saved["usage"]["prompt_tokens_saved"].as_u64().unwrap();
    assert!(n > 0, "{saved}");
    assert!(
        saved["usage"]["prompt_tokens"].as_u64().unwrap()
            < plain["usage"]["prompt_tokens"].as_u64().unwrap()
    );
    assert_eq!(
        value_of(&metrics(&base).await, "weir_prompt_tokens_saved_total"),
        n as f64
    );
    let bad = chat(
        &base,
        &ask(clean),
        Some(("x-weir-prompt-optimization", "max")),
    )
    .await;
    assert_eq!(bad.0, 400);

    // On in the CachePolicy: no header needed, and `off` opts out.
    let policy = CachePolicySpec {
        prompt_optimization: PromptOptimization::Conservative,
        ..CachePolicySpec::default()
    };
    let base = start(EngineConfig::default(), policy, None).await;
    let (_, _, by_policy) = chat(&base, &ask(messy), None).await;
    assert_eq!(by_policy["usage"]["prompt_tokens_saved"].as_u64(), Some(n));
    let off = Some(("x-weir-prompt-optimization", "off"));
    let (_, _, opted_out) = chat(&base, &ask(messy), off).await;
    assert!(opted_out["usage"].get("prompt_tokens_saved").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_chat_drops_its_oldest_turns_only_when_asked() {
    let mut messages = vec![json!({"role": "system", "content": "You answer briefly."})];
    for i in 0..40 {
        messages.push(json!({"role": "user", "content": format!("Question number {i} about the weather today?")}));
        messages.push(json!({"role": "assistant", "content": format!("Answer number {i}: it is sunny and warm.")}));
    }
    messages.push(json!({"role": "user", "content": "And tomorrow?"}));
    let body = json!({"model": "tiny", "messages": messages, "max_tokens": 16, "temperature": 0});
    let small = EngineConfig {
        max_model_len: Some(256),
        ..EngineConfig::default()
    };
    let strict = start(small.clone(), CachePolicySpec::default(), None).await;
    let (status, _, error) = chat(&strict, &body, None).await;
    assert_eq!(status, 400, "{error}");

    let fitting = EngineConfig {
        context_overflow: ContextOverflow::TruncateOldest,
        ..small
    };
    let base = start(fitting, CachePolicySpec::default(), None).await;
    let (status, headers, answer) = chat(&base, &body, None).await;
    assert_eq!(status, 200, "{answer}");
    let dropped: usize = headers["x-weir-context-dropped-turns"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=40).contains(&dropped), "{dropped}");
    let prompt = answer["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        prompt + 16 <= 256,
        "prompt {prompt} leaves no room for 16 tokens in 256"
    );
    // A chat that fits is not touched.
    let short =
        json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
    let (status, headers, _) = chat(&base, &short, None).await;
    assert_eq!(status, 200);
    assert!(!headers.contains_key("x-weir-context-dropped-turns"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_trouble_shows_in_the_metrics() {
    let mut cache = CachePolicySpec::default();
    cache.response_cache.l2 = Some(weir_crds::cache_policy::RedisCacheSpec {
        url_secret_ref: weir_crds::common::SecretKeyRef {
            name: "unused".into(),
            key: "url".into(),
        },
        key_prefix: "weir-test:".into(),
        ttl_seconds: 60,
        compress_above_bytes: 1024,
        write_mode: weir_crds::cache_policy::WriteMode::WriteThrough,
        write_behind_queue: 4,
        timeout_ms: 200,
    });
    // Nothing listens there: every Redis call fails.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("redis://{}", dead.local_addr().unwrap());
    drop(dead);
    let base = start(EngineConfig::default(), cache, Some(url)).await;
    for i in 0..3 {
        let body = json!({"model": "tiny", "messages": [{"role": "user", "content": format!("q{i}")}],
                          "max_tokens": 2, "temperature": 0});
        assert_eq!(
            chat(&base, &body, None).await.0,
            200,
            "a dead Redis never fails a request"
        );
    }
    let text = metrics(&base).await;
    let failed = value_of(&text, "weir_cache_l2_errors_total")
        + value_of(&text, "weir_cache_l2_timeouts_total");
    assert!(
        failed >= 1.0,
        "{failed} failed Redis calls counted:\n{text}"
    );
    assert!(
        text.contains("weir_cache_l2_breaker_state{model_name=\"tiny\"}"),
        "{text}"
    );
    assert!(text.contains("weir_cache_l2_write_behind_dropped_total{model_name=\"tiny\"} 0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_unset_fields_get_the_performance_defaults() {
    let tuning = weir_crds::tuning::TuningSpec {
        mode: weir_crds::tuning::TuningMode::LoadBased,
        // One running sequence of 256 is already "high" here.
        high_load: 0.001,
        low_load: 0.0,
        interval_seconds: 1,
        ..Default::default()
    };
    let spec = ModelSpec {
        name: "tiny".into(),
        dir: builtin_dir(),
        engine: EngineConfig::default(),
        cache: CachePolicySpec::default(),
        batch: BatchPolicySpec {
            tuning,
            ..BatchPolicySpec::default()
        },
        redis_url: None,
    };
    let mut registry = ModelRegistry::default();
    registry.insert(ServedModel::load(&spec).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let state = AppState::new(registry);
    tokio::spawn(async move { axum::serve(listener, router(state)).await });

    let ask = |max_tokens: Option<u32>| {
        let mut body = json!({"model": "tiny", "messages": [{"role": "user", "content": "go"}],
                              "ignore_eos": true, "seed": 1});
        if let Some(m) = max_tokens {
            body["max_tokens"] = json!(m);
        }
        body
    };
    // Idle: quality, the usual defaults.
    let (status, headers, _) = chat(&base, &ask(Some(2)), None).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-weir-tuning"], "quality");
    // A long answer keeps the engine busy.
    let holder = {
        let base = base.clone();
        let mut body = ask(Some(1800));
        body["n"] = json!(2);
        tokio::spawn(async move { chat(&base, &body, None).await.0 })
    };
    tokio::time::sleep(std::time::Duration::from_millis(1300)).await;
    let (status, headers, tuned) = chat(&base, &ask(None), None).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-weir-tuning"], "performance");
    assert_eq!(tuned["usage"]["completion_tokens"], 256, "{tuned}");
    let (_, _, explicit) = chat(&base, &ask(Some(300)), None).await;
    assert_eq!(
        explicit["usage"]["completion_tokens"], 300,
        "an explicit value is kept"
    );
    assert!(
        metrics(&base)
            .await
            .contains("weir_tuning_mode{model_name=\"tiny\"} 2")
    );
    assert_eq!(holder.await.unwrap(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_grades_what_was_served() {
    let base = start(EngineConfig::default(), CachePolicySpec::default(), None).await;
    let idle: Value = reqwest::get(format!("{base}/v1/weir/report"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(idle["models"][0]["model"], "tiny");
    assert_eq!(idle["models"][0]["figures"]["requests"], 0);
    assert!(
        idle["models"][0]["report"].is_null(),
        "no grade without requests"
    );
    for i in 0..5 {
        let body = json!({"model": "tiny", "messages": [{"role": "user", "content": format!("r{i}")}],
                          "max_tokens": 3, "temperature": 0});
        assert_eq!(chat(&base, &body, None).await.0, 200);
    }
    let report: Value = reqwest::get(format!("{base}/v1/weir/report"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let model = &report["models"][0];
    assert_eq!(model["figures"]["requests"], 5, "{report}");
    assert_eq!(model["figures"]["successRate"], 1.0);
    let grade = model["report"]["grade"].as_str().unwrap();
    assert!(["A+", "A", "B", "C"].contains(&grade), "{grade}");
    assert!(model["figures"]["p50TtftMs"].as_f64().unwrap() > 0.0);
}
