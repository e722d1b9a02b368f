//! An ensemble served by a standalone agent from a config file: traffic
//! splits by weight over two local models and an external OpenAI-compatible
//! endpoint (another agent requiring an API key, read from a mounted Secret
//! file), and a dead member is skipped by fallback without failing requests.

use std::collections::BTreeMap;

use serde_json::json;
use weir_e2e::process::{Agent, free_port};
use weir_engine::testmodel::{TinyModelSpec, write_tiny_model};

async fn ask(url: &str) -> (u16, Option<String>) {
    let body = json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0});
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let member = r
        .headers()
        .get("x-weir-ensemble-member")
        .map(|v| v.to_str().unwrap().to_owned());
    (r.status().as_u16(), member)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensembles_split_by_weight_and_fall_back() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    write_tiny_model(&model, &TinyModelSpec::llama()).unwrap();
    let external = Agent::start(&[
        "--model",
        model.to_str().unwrap(),
        "--served-name",
        "remote",
        "--api-key",
        "k3y",
    ]);
    let secrets = dir.path().join("secrets");
    std::fs::create_dir_all(secrets.join("remote-key")).unwrap();
    std::fs::write(secrets.join("remote-key/api-key"), "k3y\n").unwrap();
    let dead = format!("http://127.0.0.1:{}/v1", free_port());
    let config = format!(
        r#"
kind: Model
metadata: {{name: a}}
spec: {{source: {{uri: "file://{m}"}}, servedName: model-a}}
---
kind: Model
metadata: {{name: b}}
spec: {{source: {{uri: "file://{m}"}}, servedName: model-b}}
---
kind: ModelEnsemble
metadata: {{name: chat}}
spec:
  strategy: Weighted
  members:
  - {{name: first, modelRef: {{name: a}}, weight: 6}}
  - {{name: second, modelRef: {{name: b}}, weight: 2}}
  - name: outside
    weight: 2
    endpoint: {{url: "{ext}/v1", model: remote, apiKeySecretRef: {{name: remote-key, key: api-key}}}}
---
kind: ModelEnsemble
metadata: {{name: shaky}}
spec:
  members:
  - {{name: gone, weight: 9, endpoint: {{url: "{dead}", model: x, timeoutSeconds: 2}}}}
  - {{name: steady, modelRef: {{name: a}}, weight: 1}}
  fallback: {{enabled: true, maxAttempts: 2}}
"#,
        m = model.display(),
        ext = external.url,
    );
    let path = dir.path().join("weir.yaml");
    std::fs::write(&path, config).unwrap();
    let agent = Agent::start(&[
        "--config",
        path.to_str().unwrap(),
        "--secrets-dir",
        secrets.to_str().unwrap(),
    ]);

    let mut counts = BTreeMap::new();
    for _ in 0..200 {
        let (status, member) = ask(&agent.url).await;
        assert_eq!(status, 200);
        *counts.entry(member.unwrap()).or_insert(0) += 1;
    }
    let share = |m: &str| f64::from(*counts.get(m).unwrap_or(&0)) / 200.0;
    assert!((share("first") - 0.6).abs() < 0.12, "{counts:?}");
    assert!((share("second") - 0.2).abs() < 0.1, "{counts:?}");
    assert!((share("outside") - 0.2).abs() < 0.1, "{counts:?}");

    // The dead member takes 90 % of the weight; fallback answers anyway.
    let body =
        json!({"model": "shaky", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    for _ in 0..10 {
        let r = reqwest::Client::new()
            .post(format!("{}/v1/chat/completions", agent.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert_eq!(r.headers()["x-weir-ensemble-member"], "steady");
    }
    let models: serde_json::Value = reqwest::get(format!("{}/v1/models", agent.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert!(ids.contains(&"chat") && ids.contains(&"shaky"), "{ids:?}");
}
