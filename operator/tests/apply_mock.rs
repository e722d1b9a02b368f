//! The operator's writes against a mocked API server (`tower-test`) that
//! asserts each call: NodeAgent specs and Model statuses go out by
//! server-side apply under the operator's field manager, unchanged objects
//! are not written, and decisions are explained by events.

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};
use tower_test::mock;
use weir_crds::Model;
use weir_crds::model::ModelStatus;
use weir_operator::{apply, world};

fn client() -> (kube::Client, mock::Handle<Request<Body>, Response<Body>>) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (kube::Client::new(service, "default"), handle)
}

async fn body(request: Request<Body>) -> Value {
    serde_json::from_slice(&request.into_body().collect_bytes().await.unwrap()).unwrap()
}

fn reply(send: mock::SendResponse<Response<Body>>, value: Value) {
    let response = Response::builder()
        .status(StatusCode::OK)
        .body(Body::from(serde_json::to_vec(&value).unwrap()))
        .unwrap();
    send.send_response(response);
}

fn model() -> Model {
    serde_json::from_value(json!({"apiVersion": "weir.dev/v1alpha1", "kind": "Model",
        "metadata": {"name": "llama", "namespace": "ml", "generation": 2},
        "spec": {"source": {"uri": "hf://org/llama"}, "servedName": "llama-chat"}}))
    .unwrap()
}

#[tokio::test]
async fn a_models_node_agent_entry_is_applied_under_its_own_field_manager() {
    let (client, mut handle) = client();
    let entry = world::assignment(&model(), Default::default(), Default::default());
    let manager = apply::model_manager("ml", "llama");
    assert_eq!(manager, "weir-operator/ml/llama");
    let server = tokio::spawn(async move {
        let (req, send) = handle.next_request().await.expect("PATCH nodeagent");
        assert_eq!(
            (req.method(), req.uri().path()),
            (&Method::PATCH, "/apis/weir.dev/v1alpha1/nodeagents/gpu-1")
        );
        let query = req.uri().query().unwrap_or_default().to_owned();
        assert!(
            query.contains("fieldManager=weir-operator%2Fml%2Fllama")
                && query.contains("force=true"),
            "{query}"
        );
        let sent = body(req).await;
        assert_eq!(sent["spec"]["models"].as_array().unwrap().len(), 1);
        assert_eq!(sent["spec"]["models"][0]["servedName"], "llama-chat");
        assert_eq!(
            sent["spec"]["models"][0]["modelRef"],
            json!({"namespace": "ml", "name": "llama"})
        );
        assert!(
            sent["spec"].get("nodeName").is_none(),
            "the agent owns nodeName"
        );
        let mut stored = sent.clone();
        stored["spec"]["nodeName"] = json!("gpu-1");
        reply(send, stored.clone());
        // Removal applies nothing under the same manager.
        let (req, send) = handle.next_request().await.expect("PATCH removal");
        let query = req.uri().query().unwrap_or_default().to_owned();
        assert!(
            query.contains("fieldManager=weir-operator%2Fml%2Fllama"),
            "{query}"
        );
        let sent = body(req).await;
        assert!(sent.get("spec").is_none(), "{sent}");
        assert_eq!(sent["metadata"]["name"], "gpu-1");
        stored["spec"]["models"] = json!([]);
        reply(send, stored);
    });
    apply::assignment(&client, "gpu-1", &manager, Some(&entry))
        .await
        .unwrap();
    apply::assignment(&client, "gpu-1", &manager, None)
        .await
        .unwrap();
    server.await.unwrap();
}

#[test]
fn long_model_keys_get_a_short_stable_field_manager() {
    let name = "m".repeat(253);
    let a = apply::model_manager("ns", &name);
    assert!(a.len() <= 128, "{}", a.len());
    assert_eq!(a, apply::model_manager("ns", &name));
    assert_ne!(a, apply::model_manager("ns", &"m".repeat(252)));
    assert!(a.starts_with("weir-operator/ns/mmm"));
}

#[tokio::test]
async fn model_status_and_events_explain_a_missing_policy() {
    let (client, mut handle) = client();
    let m = model();
    let message =
        "spec.batchPolicyRef names `fast`, which does not exist in this namespace".to_owned();
    let status: ModelStatus = world::model_status(
        &m,
        1,
        &[],
        &Default::default(),
        k8s_openapi::jiff::Timestamp::now(),
        std::time::Duration::from_secs(45),
        Some(("PolicyNotFound", message.clone())),
    );
    let server = tokio::spawn(async move {
        let (req, send) = handle.next_request().await.expect("PATCH status");
        assert_eq!(
            req.uri().path(),
            "/apis/weir.dev/v1alpha1/namespaces/ml/models/llama/status"
        );
        let sent = body(req).await;
        let condition = &sent["status"]["conditions"][0];
        assert_eq!(
            (condition["type"].as_str(), condition["status"].as_str()),
            (Some("Ready"), Some("False"))
        );
        assert_eq!(condition["reason"], "PolicyNotFound");
        assert_eq!(sent["status"]["observedGeneration"], 2);
        let mut stored = serde_json::to_value(model()).unwrap();
        stored["status"] = sent["status"].clone();
        reply(send, stored);

        let (req, send) = handle.next_request().await.expect("POST event");
        assert_eq!(req.method(), Method::POST);
        assert!(
            req.uri().path().ends_with("/namespaces/ml/events"),
            "{}",
            req.uri()
        );
        let event = body(req).await;
        assert_eq!(event["reason"], "PolicyNotFound");
        assert_eq!(event["type"], "Warning");
        assert!(event["note"].as_str().unwrap().contains("`fast`"));
        assert_eq!(event["regarding"]["name"], "llama");
        reply(send, event);
    });
    assert!(apply::model_status(&client, &m, &status).await.unwrap());
    apply::event(&client, &m, true, "PolicyNotFound", message).await;
    server.await.unwrap();
}
