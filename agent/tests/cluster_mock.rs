//! Cluster mode against a mocked API server (`tower-test`) that asserts each
//! call the agent makes, in order: registration creates the NodeAgent owned
//! by its Node, and a heartbeat writes status by server-side apply.

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};
use tower_test::mock;
use weir_agent::cluster::plan::SourceRoots;
use weir_agent::cluster::{ClusterConfig, ModelStates, heartbeat, register};
use weir_agent::http::AppState;
use weir_agent::models::ModelRegistry;

type Handle = mock::Handle<Request<Body>, Response<Body>>;

fn client() -> (kube::Client, Handle) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (kube::Client::new(service, "default"), handle)
}

async fn body_json(request: Request<Body>) -> Value {
    let bytes = request.into_body().collect_bytes().await.unwrap();
    if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    }
}

fn respond(handle_send: mock::SendResponse<Response<Body>>, status: StatusCode, body: Value) {
    let response = Response::builder()
        .status(status)
        .body(Body::from(serde_json::to_vec(&body).unwrap()))
        .unwrap();
    handle_send.send_response(response);
}

fn not_found(kind: &str, name: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404,
           "message": format!("{kind} \"{name}\" not found")})
}

#[tokio::test]
async fn registration_creates_a_node_owned_node_agent() {
    let (client, mut handle) = client();
    let server = tokio::spawn(async move {
        let (req, send) = handle.next_request().await.expect("GET nodeagent");
        assert_eq!(
            (req.method(), req.uri().path()),
            (&Method::GET, "/apis/weir.dev/v1alpha1/nodeagents/gpu-1")
        );
        respond(
            send,
            StatusCode::NOT_FOUND,
            not_found("nodeagents.weir.dev", "gpu-1"),
        );

        let (req, send) = handle.next_request().await.expect("GET node");
        assert_eq!(
            (req.method(), req.uri().path()),
            (&Method::GET, "/api/v1/nodes/gpu-1")
        );
        respond(
            send,
            StatusCode::OK,
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "gpu-1", "uid": "uid-42"}}),
        );

        let (req, send) = handle.next_request().await.expect("POST nodeagent");
        assert_eq!(
            (req.method(), req.uri().path()),
            (&Method::POST, "/apis/weir.dev/v1alpha1/nodeagents")
        );
        let body = body_json(req).await;
        assert_eq!(body["metadata"]["name"], "gpu-1");
        assert_eq!(body["spec"]["nodeName"], "gpu-1");
        let owner = &body["metadata"]["ownerReferences"][0];
        assert_eq!(
            (owner["kind"].as_str(), owner["uid"].as_str()),
            (Some("Node"), Some("uid-42"))
        );
        respond(send, StatusCode::CREATED, body);
    });
    let agent = register(&client, "gpu-1").await.unwrap();
    assert_eq!(agent.spec.node_name, "gpu-1");
    server.await.unwrap();
}

#[tokio::test]
async fn an_existing_node_agent_is_reused() {
    let (client, mut handle) = client();
    let server = tokio::spawn(async move {
        let (req, send) = handle.next_request().await.expect("GET nodeagent");
        assert_eq!(req.method(), Method::GET);
        respond(
            send,
            StatusCode::OK,
            json!({"apiVersion": "weir.dev/v1alpha1", "kind": "NodeAgent",
            "metadata": {"name": "gpu-1"}, "spec": {"nodeName": "gpu-1", "models": []}}),
        );
        assert!(
            handle.next_request().await.is_none(),
            "no further calls expected"
        );
    });
    register(&client, "gpu-1").await.unwrap();
    drop(client);
    server.await.unwrap();
}

#[tokio::test]
async fn heartbeat_applies_status_with_endpoint_and_ready_condition() {
    let (client, mut handle) = client();
    let config = ClusterConfig {
        node_name: "gpu-1".into(),
        endpoint: "http://10.0.0.7:8080".into(),
        heartbeat: std::time::Duration::from_secs(10),
        roots: SourceRoots {
            model_cache: "/c".into(),
            pvc_root: "/p".into(),
        },
        downloads: weir_agent::cluster::fetch::Downloads::new(weir_agent::hub::Hub::new(
            "http://127.0.0.1:9",
        )),
        drain_timeout: std::time::Duration::from_secs(30),
        beat_now: Default::default(),
    };
    let state = AppState::new(ModelRegistry::default());
    let states = ModelStates::default();
    states.write().unwrap().insert(
        "broken".into(),
        weir_agent::cluster::status::ModelState::failed("SourceUnavailable", "no such dir".into()),
    );
    let server = tokio::spawn(async move {
        let (req, send) = handle.next_request().await.expect("PATCH status");
        assert_eq!(req.method(), Method::PATCH);
        assert_eq!(
            req.uri().path(),
            "/apis/weir.dev/v1alpha1/nodeagents/gpu-1/status"
        );
        let query = req.uri().query().unwrap_or_default().to_owned();
        assert!(
            query.contains("fieldManager=weir-agent") && query.contains("force=true"),
            "{query}"
        );
        assert_eq!(
            req.headers()["content-type"],
            "application/apply-patch+yaml"
        );
        let body = body_json(req).await;
        let status = &body["status"];
        assert_eq!(status["endpoint"], "http://10.0.0.7:8080");
        assert_eq!(status["backend"], "Cpu");
        assert_eq!(status["observedGeneration"], 3);
        assert_eq!(status["conditions"][0]["type"], "Ready");
        assert!(status["lastHeartbeatTime"].is_string());
        let model = &status["models"][0];
        assert_eq!(
            (model["servedName"].as_str(), model["phase"].as_str()),
            (Some("broken"), Some("Failed"))
        );
        assert_eq!(model["reason"], "SourceUnavailable");
        let mut stored = body.clone();
        stored["metadata"] = json!({"name": "gpu-1", "generation": 3});
        stored["spec"] = json!({"nodeName": "gpu-1"});
        respond(send, StatusCode::OK, stored);
    });
    heartbeat(&client, &config, &state, &states, Some(3))
        .await
        .unwrap();
    server.await.unwrap();
}
