//! `/v1/embeddings` and the semantic cache over real HTTP, with the real
//! all-MiniLM-L6-v2 (fetched with pip, see `testmodel::minilm_dir`) where
//! meaning matters and the built-in tiny encoder where only shape does.

use std::path::PathBuf;
use std::sync::OnceLock;

use base64::Engine as _;
use serde_json::{Value, json};
use weir_agent::http::{AppState, router};
use weir_agent::models::{
    Loaded, ModelRegistry, ModelSpec, ensure_builtin, ensure_builtin_encoder,
};
use weir_crds::cache_policy::{CachePolicySpec, SemanticScope};
use weir_engine::testmodel::minilm_dir;

fn cache_root() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("weir-agent-embed-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        root
    })
    .clone()
}

fn spec(name: &str, dir: PathBuf, cache: CachePolicySpec) -> ModelSpec {
    ModelSpec {
        name: name.into(),
        dir,
        cache,
        ..ModelSpec::default()
    }
}

/// An agent serving the built-in generator as `tiny` (semantic cache on,
/// scope `scope`, encoder `minilm`), the real MiniLM as `minilm` and the
/// built-in encoder as `embed-tiny`.
async fn start(scope: SemanticScope) -> String {
    let mut cache = CachePolicySpec::default();
    cache.semantic_cache.enabled = true;
    cache.semantic_cache.embedding_model = "minilm".into();
    cache.semantic_cache.threshold = 0.85;
    cache.semantic_cache.scope = scope;
    let root = cache_root();
    let specs = [
        spec("tiny", ensure_builtin(&root).unwrap(), cache),
        spec("minilm", minilm_dir().unwrap(), Default::default()),
        spec(
            "embed-tiny",
            ensure_builtin_encoder(&root).unwrap(),
            Default::default(),
        ),
    ];
    let mut registry = ModelRegistry::default();
    for s in &specs {
        registry.insert_loaded(Loaded::load(s).unwrap());
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = AppState::new(registry);
    tokio::spawn(async move { axum::serve(listener, router(state)).await });
    format!("http://{addr}")
}

async fn post(base: &str, path: &str, body: &Value) -> (u16, Option<String>, Value) {
    let r = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let cache = r
        .headers()
        .get("x-weir-cache")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, cache, r.json().await.unwrap())
}

fn vector(v: &Value) -> Vec<f32> {
    serde_json::from_value(v["embedding"].clone()).unwrap()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_answer_in_openai_shape() {
    let base = start(SemanticScope::LastUserMessage).await;
    let texts = [
        "What is the capital of France?",
        "Which city is the capital of France?",
        "How do I bake sourdough bread at home?",
    ];
    let (status, _, body) = post(
        &base,
        "/v1/embeddings",
        &json!({"model": "minilm", "input": texts}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], "minilm");
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    for (i, d) in data.iter().enumerate() {
        assert_eq!(d["object"], "embedding");
        assert_eq!(d["index"], i);
        assert_eq!(vector(d).len(), 384);
    }
    let v: Vec<Vec<f32>> = data.iter().map(vector).collect();
    assert!(cosine(&v[0], &v[1]) > 0.9);
    assert!(cosine(&v[0], &v[2]) < 0.3);
    let tokens = body["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(tokens > 20, "{tokens}");
    assert_eq!(body["usage"]["total_tokens"], tokens);

    // base64 carries the same little-endian f32 values.
    let (_, _, b64) = post(
        &base,
        "/v1/embeddings",
        &json!({"model": "minilm", "input": texts[0], "encoding_format": "base64"}),
    )
    .await;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_eq!(decoded, v[0]);

    // Token ids are accepted; the built-in encoder is served too.
    let (status, _, body) = post(
        &base,
        "/v1/embeddings",
        &json!({"model": "embed-tiny", "input": [[5, 6, 7], [8]], "dimensions": 64}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(vector(&body["data"][1]).len(), 64);
    let models = reqwest::get(format!("{base}/v1/models"))
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    for name in ["tiny", "minilm", "embed-tiny"] {
        assert!(ids.contains(&name), "{ids:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_embedding_requests_get_openai_errors() {
    let base = start(SemanticScope::LastUserMessage).await;
    let long = "model ".repeat(1000);
    let cases = [
        (json!({"model": "minilm", "input": []}), 400, Some("input")),
        (json!({"model": "minilm", "input": ""}), 400, Some("input")),
        (
            json!({"model": "minilm", "input": long}),
            400,
            Some("input"),
        ),
        (
            json!({"model": "minilm", "input": [[999999]]}),
            400,
            Some("input"),
        ),
        (
            json!({"model": "minilm", "input": "x", "dimensions": 12}),
            400,
            Some("dimensions"),
        ),
        (
            json!({"model": "minilm", "input": "x", "encoding_format": "int8"}),
            400,
            Some("encoding_format"),
        ),
        (json!({"model": "minilm", "input": 5}), 422, None),
        (json!({"input": "x"}), 422, None),
        (json!({"model": "nope", "input": "x"}), 404, None),
        (json!({"model": "tiny", "input": "x"}), 400, Some("model")),
    ];
    for (body, want, param) in cases {
        let (status, _, answer) = post(&base, "/v1/embeddings", &body).await;
        assert_eq!(status, want, "{body} → {answer}");
        assert!(answer["error"]["message"].is_string(), "{answer}");
        if let Some(param) = param {
            assert_eq!(answer["error"]["param"], param, "{answer}");
        }
    }
    let chat = json!({"model": "minilm", "messages": [{"role": "user", "content": "hi"}]});
    let (status, _, answer) = post(&base, "/v1/chat/completions", &chat).await;
    assert_eq!(status, 400, "{answer}");
}

fn conversation(turns: &[(&str, &str)], temperature: f32) -> Value {
    let messages: Vec<Value> = turns
        .iter()
        .map(|(role, content)| json!({"role": role, "content": content}))
        .collect();
    json!({"model": "tiny", "messages": messages, "max_tokens": 8, "temperature": temperature})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paraphrases_share_an_answer_and_other_conversations_never_do() {
    let base = start(SemanticScope::LastUserMessage).await;
    let first = conversation(&[("user", "What is the capital of France?")], 0.0);
    let (status, cache, answer) = post(&base, "/v1/chat/completions", &first).await;
    assert_eq!((status, cache.as_deref()), (200, Some("miss")), "{answer}");

    let paraphrase = conversation(&[("user", "Which city is the capital of France?")], 0.0);
    let (_, cache, hit) = post(&base, "/v1/chat/completions", &paraphrase).await;
    assert_eq!(cache.as_deref(), Some("semantic"));
    assert_eq!(
        hit["choices"][0]["message"]["content"],
        answer["choices"][0]["message"]["content"]
    );

    let unrelated = conversation(&[("user", "How do I bake sourdough bread at home?")], 0.0);
    let (_, cache, _) = post(&base, "/v1/chat/completions", &unrelated).await;
    assert_eq!(cache.as_deref(), Some("miss"));

    // The same last question after a different earlier turn: no hit.
    let earlier = |first_turn: &str| {
        conversation(
            &[
                ("user", first_turn),
                ("assistant", "Sure."),
                ("user", "What is the capital of France?"),
            ],
            0.0,
        )
    };
    let (_, cache, _) = post(
        &base,
        "/v1/chat/completions",
        &earlier("Talk about Europe."),
    )
    .await;
    assert_eq!(cache.as_deref(), Some("miss"));
    let other = conversation(
        &[
            ("user", "Talk about Asia."),
            ("assistant", "Sure."),
            ("user", "Which city is the capital of France?"),
        ],
        0.0,
    );
    let (_, cache, _) = post(&base, "/v1/chat/completions", &other).await;
    assert_eq!(cache.as_deref(), Some("miss"), "an earlier turn differs");
    let (_, cache, _) = post(
        &base,
        "/v1/chat/completions",
        &earlier("Talk about Europe."),
    )
    .await;
    assert_eq!(cache.as_deref(), Some("l1"), "the exact repeat hits L1");

    // A different parameter is a different scope.
    let mut longer = paraphrase.clone();
    longer["max_tokens"] = json!(9);
    let (_, cache, _) = post(&base, "/v1/chat/completions", &longer).await;
    assert_eq!(cache.as_deref(), Some("miss"));

    // Sampled requests are never answered from a cache.
    for _ in 0..3 {
        let sampled = conversation(&[("user", "Which city is the capital of France?")], 1.0);
        let (status, cache, _) = post(&base, "/v1/chat/completions", &sampled).await;
        assert_eq!(status, 200);
        assert_eq!(cache, None);
    }

    // A semantic hit streams as SSE too.
    let mut stream = paraphrase.clone();
    stream["stream"] = json!(true);
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(&stream)
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-weir-cache"], "semantic");
    let text = r.text().await.unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("weir_cache_hits_total{model_name=\"tiny\",tier=\"semantic\"} 2"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversation_scope_compares_the_whole_conversation() {
    let base = start(SemanticScope::Conversation).await;
    let turns = |q: &str| {
        conversation(
            &[
                ("user", "I am planning a trip."),
                ("assistant", "Nice."),
                ("user", q),
            ],
            0.0,
        )
    };
    let (_, cache, _) = post(
        &base,
        "/v1/chat/completions",
        &turns("What is the capital of France?"),
    )
    .await;
    assert_eq!(cache.as_deref(), Some("miss"));
    let (_, cache, _) = post(
        &base,
        "/v1/chat/completions",
        &turns("Which city is the capital of France?"),
    )
    .await;
    assert_eq!(cache.as_deref(), Some("semantic"));
    let (_, cache, _) = post(
        &base,
        "/v1/chat/completions",
        &turns("How do I bake sourdough bread?"),
    )
    .await;
    assert_eq!(cache.as_deref(), Some("miss"));
}

/// Asks `question` alone; the `x-weir-cache`, similarity and veto headers.
async fn ask(
    base: &str,
    question: &str,
    no_cache: bool,
) -> (Option<String>, Option<f32>, Option<String>) {
    let mut request = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(&conversation(&[("user", question)], 0.0));
    if no_cache {
        request = request.header("cache-control", "no-cache");
    }
    let r = request.send().await.unwrap();
    assert_eq!(r.status(), 200);
    let header = |name: &str| {
        r.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let similarity = header("x-weir-semantic-similarity").map(|s| s.parse().unwrap());
    (
        header("x-weir-cache"),
        similarity,
        header("x-weir-semantic-veto"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_misses_are_vetoed_and_no_cache_skips_the_lookup() {
    let base = start(SemanticScope::LastUserMessage).await;
    for (stored, near_miss, reason) in [
        (
            "Cheap flights from Paris to Rome",
            "Cheap flights from Rome to Paris",
            "roles",
        ),
        (
            "Is Python statically typed?",
            "Is Python not statically typed?",
            "negation",
        ),
        (
            "How do I zoom in on a photo?",
            "How do I zoom out on a photo?",
            "opposites",
        ),
    ] {
        assert_eq!(ask(&base, stored, false).await.0.as_deref(), Some("miss"));
        let (cache, similarity, veto) = ask(&base, near_miss, false).await;
        assert_eq!(cache.as_deref(), Some("miss"), "{near_miss}");
        assert_eq!(veto.as_deref(), Some(reason), "{near_miss}");
        assert!(similarity.unwrap() >= 0.85, "{near_miss}: {similarity:?}");
    }

    assert_eq!(
        ask(&base, "What is the capital of France?", false)
            .await
            .0
            .as_deref(),
        Some("miss")
    );
    let paraphrase = "Which city is the capital of France?";
    let (cache, similarity, veto) = ask(&base, paraphrase, false).await;
    assert_eq!(cache.as_deref(), Some("semantic"));
    assert!(similarity.unwrap() >= 0.85 && veto.is_none());
    // The client does not trust it: no-cache skips the lookup, and the hit
    // counts as refuted. The fresh answer is stored, so it hits L1 next.
    let (cache, similarity, _) = ask(&base, paraphrase, true).await;
    assert_eq!((cache.as_deref(), similarity), (Some("miss"), None));
    let (cache, ..) = ask(&base, paraphrase, false).await;
    assert_eq!(cache.as_deref(), Some("l1"));

    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "weir_semantic_cache_vetoes_total{model_name=\"tiny\",reason=\"roles\"} 1",
        "weir_semantic_cache_vetoes_total{model_name=\"tiny\",reason=\"negation\"} 1",
        "weir_semantic_cache_refuted_total{model_name=\"tiny\"} 1",
        "weir_semantic_cache_threshold{model_name=\"tiny\"} 0.85",
        "weir_semantic_cache_verify_seconds_count{model_name=\"tiny\",reason=\"rules\"}",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
}
