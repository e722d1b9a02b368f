//! Weight sizes for the GPU memory estimate: the annotation wins, then
//! what agents report, then the Hub's file sizes (over real HTTP from a
//! local server speaking the Hub's API), cached.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::extract::State;
use axum::routing::get;
use serde_json::json;
use weir_crds::{Model, NodeAgent};
use weir_operator::weights::{WeightSizes, reported};

fn model(uri: &str, annotation: Option<&str>) -> Model {
    let mut m: Model =
        serde_json::from_value(json!({"apiVersion": "weir.dev/v1alpha1", "kind": "Model",
        "metadata": {"name": "llama", "namespace": "ml"},
        "spec": {"source": {"uri": uri}}}))
        .unwrap();
    if let Some(a) = annotation {
        m.metadata.annotations = Some([("weir.dev/weights-bytes".to_owned(), a.to_owned())].into());
    }
    m
}

async fn hub() -> (String, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new()
        .route(
            "/api/models/acme/big/revision/main",
            get(|State(calls): State<Arc<AtomicUsize>>| async move {
                calls.fetch_add(1, Ordering::SeqCst);
                axum::Json(json!({"siblings": [
                    {"rfilename": "model-00001-of-00002.safetensors", "size": 30_000_000_000u64},
                    {"rfilename": "model-00002-of-00002.safetensors", "size": 10_000_000_000u64},
                    {"rfilename": "pytorch_model.bin", "size": 40_000_000_000u64},
                    {"rfilename": "config.json", "size": 700}]}))
            }),
        )
        .with_state(calls.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, calls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sizes_come_from_the_annotation_the_agents_or_the_hub() {
    let (url, calls) = hub().await;
    let sizes = WeightSizes::new(&url);
    let none = BTreeMap::new();
    assert_eq!(
        sizes.of(&model("hf://acme/big", None), &none).await,
        40_000_000_000
    );
    assert_eq!(
        sizes.of(&model("hf://acme/big", None), &none).await,
        40_000_000_000
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the Hub's answer is cached"
    );
    assert_eq!(
        sizes.of(&model("hf://acme/big", Some("123")), &none).await,
        123
    );
    assert_eq!(sizes.of(&model("hf://acme/missing", None), &none).await, 0);
    assert_eq!(sizes.of(&model("file:///m", None), &none).await, 0);

    let agent: NodeAgent = serde_json::from_value(
        json!({"apiVersion": "weir.dev/v1alpha1", "kind": "NodeAgent",
        "metadata": {"name": "gpu-1"}, "spec": {"nodeName": "gpu-1"},
        "status": {"models": [{"servedName": "llama", "phase": "Ready", "weightsBytes": 777}]}}),
    )
    .unwrap();
    let from_agents = reported(&[Arc::new(agent)]);
    assert_eq!(sizes.of(&model("file:///m", None), &from_agents).await, 777);
}
